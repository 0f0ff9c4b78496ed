"""The one Celery app and its configuration. ``celery -A worker.celery_app worker`` and
``medq worker`` run it; its tasks (``worker.tasks``, in ``include``) register the signal
handlers (``worker.signals``) as the worker loads them, before it starts."""

from __future__ import annotations

import math
from typing import Any

import click
from celery import Celery

from medq.core.settings import Settings, get_settings
from medq.state.broker import celery_broker_conf
from medq.state.connect import celery_transport_options, celery_url
from worker.broker_fixes import keep_broker_params_for_restore, wait_while_redis_full
from worker.burst import BurstStep


class MedqCelery(Celery):
    """Celery, with countdowns RabbitMQ can delay, and the settings it was made from.

    With quorum queues (RabbitMQ) Celery 5.7 delays a countdown in whole seconds through
    its native delayed delivery, and fails one under a second (``int(countdown)`` is 0:
    ``ValueError`` from ``calculate_routing_key``), as a job's retry backoff may be. Such
    a countdown is sent as one second: the job comes back a little late, never early.
    (A longer one is cut to whole seconds by Celery and the worker holds the rest.)"""

    def __init__(self, settings: Settings, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.medq_settings = settings

    def send_task(self, name: str, *args: Any, **options: Any) -> Any:
        countdown = options.get("countdown")
        if self.medq_settings.broker_is_amqp and countdown and 0 < countdown < 1:
            options["countdown"] = math.ceil(countdown)
        return super().send_task(name, *args, **options)


def create_app(settings: Settings) -> MedqCelery:
    """The worker's Celery app for ``settings``: its broker, queue, results and delivery
    guarantees. ``app`` below is the one ``celery -A worker.celery_app`` and ``medq worker``
    run; ``worker.burst`` makes its own for the settings it is given."""
    if not settings.broker_is_amqp:
        # Before the app makes any broker connection (``worker.broker_fixes`` says why). They
        # patch kombu's Redis transport (once per process), which a RabbitMQ broker does not
        # use (Celery's results and medq's job state use redis-py directly).
        keep_broker_params_for_restore()
        wait_while_redis_full()
    app = MedqCelery(settings, "medq", backend=celery_url(settings.redis_url), include=["worker.tasks"])
    # The broker, its queue and its transport options (``medq.state.broker``): Redis by
    # default, RabbitMQ with MEDQ_BROKER_URL=amqp://...; results always in Redis.
    app.conf.update(celery_broker_conf(settings))
    app.conf.update(
        # JSON only: a pickle payload from the broker is code execution.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # A job is acknowledged only when it has finished, and put back if its worker dies,
        # so a crash never loses one. One message at a time per slot: jobs are long.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # Redis redelivers an unacknowledged message after the visibility timeout: that is
        # how the jobs of a killed worker come back. It must outlast the longest run plus
        # the longest retry delay, or a job is handed out twice (the job lease then keeps
        # the second copy from running it); settings.broker_transport_options sets it.
        # RabbitMQ redelivers as soon as the worker's connection is gone.
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s,
                                          **celery_transport_options(settings.redis_url)},
        # No Celery time limit: the engine enforces MEDQ_WORKER__TASK_TIME_LIMIT_S on each
        # job (in every pool), and a message of many jobs must not be killed as a whole.
        result_expires=settings.results_ttl_s,
        # Flower lives on events; they carry ids and PHI-free summaries only.
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    # `celery worker --burst [BATCH]` (and `medq worker --burst`): stop once the work is done.
    app.steps["worker"].add(BurstStep)
    app.user_options["worker"].add(click.Option(
        ("--burst",), is_flag=False, flag_value="", default=None, metavar="[BATCH]",
        help="Stop (exit 0, or 1 if any job failed) once BATCH, or without one the whole queue, "
             "has no queued, running or retrying job.",
    ))
    return app


settings = get_settings()
app = create_app(settings)
