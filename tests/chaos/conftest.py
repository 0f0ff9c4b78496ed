"""Chaos tests: real workers, real Redis, the simulator, and things going wrong on purpose.

Each test adds a row to the table printed at the end of the run (and written to
``tests/artifacts/chaos.md`` by tests/conftest.py, which gathers the rows of every
pytest-xdist worker); README "Reliability" shows the table of one full run.
Plain helpers are in tests/chaos/helpers.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import MEDQ, Harness, Proc, RedisServer, wait_log
from tests.rabbitmq import restart_broker


@pytest.fixture
def chaos_env(medq_env: dict[str, str]) -> dict[str, str]:
    """Short leases and visibility timeout, so a killed worker's jobs come back in seconds."""
    return {
        **medq_env,
        "MEDQ_LLM__TIMEOUT_S": "5",
        "MEDQ_WORKER__LEASE_S": "3",
        "MEDQ_WORKER__VISIBILITY_TIMEOUT_S": "8",
        "MEDQ_WORKER__RETRY_BACKOFF_S": "0.2",
        "MEDQ_WORKER__RETRY_BACKOFF_MAX_S": "2",
    }


@pytest.fixture
def start_worker(start_process: Callable[..., Proc]) -> Callable[..., Proc]:
    """Factory: a ``medq worker`` with the given env and flags, waited on until ready;
    without mingle and gossip (medq's state is in Redis), killed at teardown."""
    def start(env: dict[str, str], *flags: str, name: str = "worker", wait: bool = True) -> Proc:
        quiet = [*([] if "--" in flags else ["--"]), "--without-mingle", "--without-gossip"]
        with Harness.timed("worker start (process)"):
            proc = start_process([MEDQ, "worker", *flags, *quiet], env, name=name, kill=True)
            if wait:
                wait_log(proc, " ready.", timeout_s=60)
        return proc

    return start


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, with an append-only file fsynced on every write, so
    a restart keeps the queue; ``stop()`` shuts it down cleanly, ``start()`` brings it back."""
    server = RedisServer(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always", "--save", "")
    yield server
    server.kill()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, without persistence: for a test that reads
    server-wide figures (INFO commandstats), which tests beside it would add to."""
    server = RedisServer(tmp_path / "own-redis", "--save", "", "--appendonly", "no")
    yield server
    server.kill()


@dataclass
class BrokerRestart:
    """A broker that a test can restart: ``env`` to merge, ``restart(down_s)`` stops it
    for ``down_s`` and starts it again (returns how long it was down)."""

    name: str
    env: dict[str, str]
    restart: Callable[[float], float]


@pytest.fixture
def restartable_broker(request: pytest.FixtureRequest, broker: dict[str, str]) -> BrokerRestart:
    """``broker``, restartable. RabbitMQ: ``rabbitmqctl stop_app`` / ``start_app``, a real
    restart of the broker (every connection closed; quorum queues and their messages kept
    on disk); about 2 s plus ``down_s`` here, for every user of the node. Redis: a
    redis-server of the test's own with an append-only file (``private_redis``) as the
    broker only (MEDQ_BROKER_URL), so that, as with RabbitMQ, the job state in
    MEDQ_REDIS_URL stays up while the broker restarts."""
    if "MEDQ_BROKER_URL" in broker:
        return BrokerRestart("RabbitMQ", broker, restart_broker)
    ctl = request.getfixturevalue("private_redis")

    def restart(down_s: float) -> float:
        started = time.monotonic()
        ctl.stop()
        time.sleep(down_s)
        ctl.start()
        return time.monotonic() - started

    return BrokerRestart("Redis", {"MEDQ_BROKER_URL": ctl.url}, restart)
