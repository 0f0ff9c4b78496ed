"""RabbitMQ as the broker (``MEDQ_BROKER_URL=amqp://...``): `medq enqueue` and a real
worker run a batch through it, a retry's countdown waits in RabbitMQ (Celery's native
delayed delivery), and the queue is a quorum queue with a prefetch per consumer.
Job state and results stay in Redis. Each test has a vhost of its own (tests/rabbitmq.py).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from medq.core.contract import QUEUE
from medq.state.jobs import iter_states
from tests.helpers import Proc, records, run_cli, stats
from tests.rabbitmq import consumers, message_counts, own_vhost, queues, skip_unless_rabbitmq


@pytest.fixture
def vhost() -> Iterator[tuple[str, str]]:
    """``(vhost, amqp URL)``; put it first in a test's arguments, so that the vhost is made
    before its workers start and deleted after they stop."""
    skip_unless_rabbitmq()
    with own_vhost() as made:
        yield made


def _results(env: dict[str, str], batch: str) -> list[dict]:
    res = run_cli(["results", batch], env)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


def test_a_batch_runs_through_rabbitmq_on_a_quorum_queue(
    vhost: tuple[str, str], r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str],
    worker_process: Callable[..., Proc], tmp_path: Path,
) -> None:
    name, url = vhost
    env = {**medq_env, "MEDQ_BROKER_URL": url}
    base = simulator("--latency-ms", "20")
    w = worker_process(base, env=env)  # -c 4
    # One job's first request fails: its retry's countdown (backoff 0.2 s) is under the
    # second that RabbitMQ's delayed delivery counts in (Celery alone fails to send it).
    httpx.post(base.removesuffix("/v1") + "/sim/script", json={"outcomes": ["500"]}).raise_for_status()
    res = run_cli(["enqueue", str(records(tmp_path / "notes.jsonl", 30)), "--schema", "clinical_note",
                   "--batch", "amqp", "--wait", "--timeout-s", "60"], env)
    assert res.returncode == 0, res.stderr
    docs = _results(env, "amqp")
    assert [d["id"] for d in docs] == [f"r{i:03d}" for i in range(30)]
    assert all(d["status"] == "succeeded" for d in docs)
    assert sorted(d["attempts"] for d in docs) == [1] * 29 + [2]
    assert "retry in" in w.log and "could not send retries" not in w.log

    assert queues(name, "type", "durable")[QUEUE] == ["quorum", "true"]
    # Quorum queues have no global QoS: the worker's prefetch is its consumer's own,
    # concurrency x worker_prefetch_multiplier (1) task messages.
    assert [c["prefetch_count"] for c in consumers(name) if c["queue"] == QUEUE] == ["4"]
    # The messages went to RabbitMQ, not to Redis (which holds the job state).
    assert not r.exists(QUEUE) and not list(r.scan_iter("_kombu.binding.*"))


def test_a_retry_waits_its_countdown_in_rabbitmq(
    vhost: tuple[str, str], r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str],
    worker_process: Callable[..., Proc], tmp_path: Path,
) -> None:
    name, url = vhost
    # One 500, then a retry 3 to 6 s later (backoff 6 s with equal jitter).
    env = {**medq_env, "MEDQ_BROKER_URL": url, "MEDQ_WORKER__RETRY_BACKOFF_S": "6", "MEDQ_WORKER__RETRY_BACKOFF_MAX_S": "6"}
    base = simulator()
    w = worker_process(base, env=env)
    httpx.post(base.removesuffix("/v1") + "/sim/script", json={"outcomes": ["500"]}).raise_for_status()
    res = run_cli(["enqueue", str(records(tmp_path / "one.jsonl", 1)), "--schema", "clinical_note", "--batch", "retry"], env)
    assert res.returncode == 0, res.stderr

    delay_queues = [q for q in queues(name) if q.startswith("celery_delayed_")]
    held_in: set[str] = set()  # the delay queues seen holding the retry
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and next(iter_states(r, "retry")).status != "succeeded":
        held_in |= {q for q, n in message_counts(url, delay_queues).items() if n}
        time.sleep(0.1)
    [doc] = _results(env, "retry")
    assert doc["status"] == "succeeded" and doc["attempts"] == 2, doc

    [countdown_s] = [float(s) for s in re.findall(r"retry in ([0-9.]+)s", w.log)]
    first, second = stats(base)["arrivals"]
    print(f"countdown {countdown_s:.1f} s; the retry's request came {second - first:.2f} s after the first; "
          f"held in {sorted(held_in)}")
    assert second - first >= countdown_s - 0.1  # not early (the log rounds to 0.1 s)
    assert held_in  # it waited in RabbitMQ's delay queues, not unacknowledged in the worker
