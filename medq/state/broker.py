"""The broker as every Celery app of medq sees it: the worker's (and Flower's), and the
producer's (``medq enqueue``, ``medq api``, the tools). Which broker is decided by
``Settings.effective_broker_url``; this module turns that into Celery configuration, so
that both ends declare the ``medq`` queue alike (RabbitMQ refuses a second declaration
of a queue with other arguments).

Redis (the default): the queue is a list named ``medq``, as it always was.

RabbitMQ (``MEDQ_BROKER_URL=amqp://...``), the way Celery runs on it in production:

- ``medq`` is a durable *quorum* queue: its messages are on disk (replicated on a
  cluster) and survive a broker restart. Quorum queues have no global QoS: Celery sees
  the queue's ``x-queue-type`` (``worker_detect_quorum_queues``) and sets a prefetch per
  consumer, ``worker_prefetch_multiplier`` x concurrency messages.
- A countdown (a job put back for later) waits in RabbitMQ, not in the worker: Celery's
  native delayed delivery routes it through the ``celery_delayed_*`` exchanges and
  queues that the worker declares at start, and back to ``medq``. That needs a topic
  exchange (Celery skips direct ones and the worker would hold the message instead).
- A message comes back as soon as the connection of the worker that held it is gone
  (no visibility timeout), and publishing waits for the broker's confirm
  (``Settings.broker_transport_options``).
"""

from __future__ import annotations

from typing import Any

from kombu import Exchange, Queue

from medq.core.contract import QUEUE
from medq.core.settings import Settings
from medq.state.connect import celery_transport_options, celery_url

# RabbitMQ 4 drops a quorum queue's message after 20 returns by default. medq puts a
# message back on purpose (Redis unreachable: ``worker.tasks``) and counts a job's lost
# runs itself (MEDQ_WORKER__MAX_LOST_RUNS), so the broker must not drop one. -1 means
# "no limit" only from RabbitMQ 4 on (3.x would drop at the first return): a number no
# message reaches instead.
DELIVERY_LIMIT = 1_000_000


def quorum_queue() -> Queue:
    """The ``medq`` queue as it is declared on RabbitMQ."""
    # kombu ships no type annotations
    exchange = Exchange(QUEUE, type="topic", durable=True)  # type: ignore[no-untyped-call]
    arguments = {"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT}
    return Queue(QUEUE, exchange, routing_key=QUEUE, durable=True, queue_arguments=arguments)  # type: ignore[no-untyped-call]


def celery_broker_conf(settings: Settings) -> dict[str, Any]:
    """Celery configuration of the broker (``app.conf.update(**celery_broker_conf(s))``),
    the same for every app that sends or takes task messages."""
    conf: dict[str, Any] = {
        # a sentinel:// URL as kombu takes it, and its master's name
        "broker_url": celery_url(settings.effective_broker_url),
        "broker_transport_options": {**settings.broker_transport_options,
                                     **celery_transport_options(settings.effective_broker_url)},
        "broker_connection_retry_on_startup": True,
        "task_default_queue": QUEUE,
    }
    if settings.broker_is_amqp:
        conf.update(
            task_queues=(quorum_queue(),),
            task_default_exchange=QUEUE,
            task_default_exchange_type="topic",
            task_default_routing_key=QUEUE,
            worker_detect_quorum_queues=True,
            broker_native_delayed_delivery_queue_type="quorum",
        )
    return conf
