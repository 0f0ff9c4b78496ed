"""Which broker medq's Celery apps use, and how they declare its queue (medq.state.broker).
No broker is needed: this is the configuration both the worker and the producer read."""

from __future__ import annotations

import pytest

from medq.core.contract import QUEUE
from medq.core.settings import Settings
from medq.state.broker import DELIVERY_LIMIT, celery_broker_conf

REDIS = "redis://127.0.0.1:6379/3"


@pytest.mark.parametrize(
    ("broker_url", "effective", "amqp"),
    [
        (None, REDIS, False),
        ("", REDIS, False),  # MEDQ_BROKER_URL= (compose passes it empty): the Redis URL
        ("amqp://u:p@rabbit:5672/medq", "amqp://u:p@rabbit:5672/medq", True),
        ("amqps://u:p@rabbit:5671/medq", "amqps://u:p@rabbit:5671/medq", True),
        ("redis://other:6379/1", "redis://other:6379/1", False),
    ],
)
def test_the_broker_is_the_redis_url_unless_set(broker_url: str | None, effective: str, amqp: bool) -> None:
    s = Settings(redis_url=REDIS, broker_url=broker_url)
    assert (s.effective_broker_url, s.broker_is_amqp) == (effective, amqp)
    assert celery_broker_conf(s)["broker_url"] == effective


def test_redis_keeps_its_visibility_timeout_and_plain_queue() -> None:
    conf = celery_broker_conf(Settings(redis_url=REDIS, broker_url=None))
    assert conf["broker_transport_options"]["visibility_timeout"] == Settings().visibility_timeout_s
    assert conf["task_default_queue"] == QUEUE and "task_queues" not in conf


def test_rabbitmq_gets_a_quorum_queue_on_a_topic_exchange_and_publisher_confirms() -> None:
    conf = celery_broker_conf(Settings(redis_url=REDIS, broker_url="amqp://u:p@rabbit:5672/medq"))
    assert conf["broker_transport_options"] == {"confirm_publish": True}
    [queue] = conf["task_queues"]
    assert (queue.name, queue.routing_key, queue.durable) == (QUEUE, QUEUE, True)
    assert queue.queue_arguments == {"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT}
    # Celery's native delayed delivery (countdowns held by RabbitMQ) skips direct exchanges.
    assert queue.exchange.type == "topic" and conf["task_default_exchange_type"] == "topic"
    assert conf["worker_detect_quorum_queues"] is True
