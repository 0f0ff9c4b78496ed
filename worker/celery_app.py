"""The one Celery app and its configuration. ``celery -A worker.celery_app worker`` and
``medq worker`` run it; its tasks (``worker.tasks``, in ``include``) register the signal
handlers (``worker.signals``) as the worker loads them, before it starts."""

from __future__ import annotations

from celery import Celery

from medq.core.contract import QUEUE
from medq.core.settings import get_settings
from worker.broker_fixes import keep_broker_params_for_restore, wait_while_redis_full

settings = get_settings()

# Before the app makes any broker connection (``worker.broker_fixes`` says why).
keep_broker_params_for_restore()
wait_while_redis_full()

app = Celery("medq", broker=settings.redis_url, backend=settings.redis_url, include=["worker.tasks"])
app.conf.update(
    # JSON only: a pickle payload from the broker is code execution.
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    task_default_queue=QUEUE,
    # A job is acknowledged only when it has finished, and put back if its worker dies,
    # so a crash never loses one. One message at a time per slot: jobs are long.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_cancel_long_running_tasks_on_connection_loss=True,
    # Redis redelivers an unacknowledged message after the visibility timeout: that is
    # how the jobs of a killed worker come back. It must outlast the longest run plus
    # the longest retry delay, or a job is handed out twice (the job lease then keeps
    # the second copy from running it). Sweep for such messages every quarter of it
    # (kombu's default sweep is every ~100 s, however short the timeout).
    broker_transport_options=settings.broker_transport_options,
    result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
    # No Celery time limit: the engine enforces MEDQ_WORKER__TASK_TIME_LIMIT_S on each
    # job (in every pool), and a message of many jobs must not be killed as a whole.
    result_expires=settings.results_ttl_s,
    broker_connection_retry_on_startup=True,
    # Flower lives on events; they carry ids and PHI-free summaries only.
    worker_send_task_events=True,
    task_send_sent_event=True,
)


