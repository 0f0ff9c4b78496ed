"""RabbitMQ for the tests: a vhost of the test's own on the local node, its queues as
``rabbitmqctl`` lists them, and a restart of the broker.

Each test gets a vhost ``medq-test-<random>`` (``rabbitmqctl add_vhost``, guest allowed
in it) and deletes it after, with every queue and message in it: tests never touch
another vhost's queues. Needs ``rabbitmqctl`` (run as root or the rabbitmq user) and the
node on 127.0.0.1:5672 with the guest user; without them the tests skip, saying why.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import kombu
import pytest

HOST, PORT = "127.0.0.1", 5672
USER = PASSWORD = "guest"


def rabbitmqctl(*args: str, timeout_s: float = 60) -> str:
    res = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=timeout_s)
    if res.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


def skip_unless_rabbitmq() -> None:
    """Skip, saying why, unless the node answers on 127.0.0.1:5672 and rabbitmqctl works;
    in CI (``.ci/run`` starts RabbitMQ) fail instead, as for Redis."""
    reason = _unavailable()
    if reason and os.environ.get("CI"):
        pytest.fail(reason)
    if reason:
        pytest.skip(reason)


@functools.cache
def _unavailable() -> str | None:
    """Why RabbitMQ cannot be used here, or None; asked once per test session."""
    if shutil.which("rabbitmqctl") is None:
        return "RabbitMQ tests need rabbitmqctl (apt-get install rabbitmq-server)"
    try:
        socket.create_connection((HOST, PORT), timeout=2).close()
    except OSError:
        return f"RabbitMQ does not answer on {HOST}:{PORT} (service rabbitmq-server start)"
    try:
        rabbitmqctl("await_startup", timeout_s=30)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return f"rabbitmqctl cannot reach the node: {exc}"
    return None


@contextmanager
def own_vhost() -> Iterator[tuple[str, str]]:
    """A vhost of the caller's own, deleted after with everything in it: yields
    ``(vhost, amqp URL)``."""
    vhost = f"medq-test-{secrets.token_hex(4)}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, USER, ".*", ".*", ".*")
        yield vhost, f"amqp://{USER}:{PASSWORD}@{HOST}:{PORT}/{vhost}"
    finally:
        rabbitmqctl("delete_vhost", vhost)


def queues(vhost: str, *columns: str) -> dict[str, list[str]]:
    """``rabbitmqctl list_queues`` of ``vhost``: queue name -> the ``columns`` asked for."""
    out = rabbitmqctl("list_queues", "-p", vhost, "--no-table-headers", "name", *columns)
    rows = [line.split("\t") for line in out.splitlines() if line.strip()]
    return {row[0]: row[1:] for row in rows}


def consumers(vhost: str) -> list[dict[str, str]]:
    """``rabbitmqctl list_consumers`` of ``vhost``: queue name and prefetch count of each."""
    out = rabbitmqctl("list_consumers", "-p", vhost, "--no-table-headers", "queue_name", "prefetch_count")
    return [dict(zip(("queue", "prefetch_count"), line.split("\t"), strict=True))
            for line in out.splitlines() if line.strip()]


def message_counts(url: str, names: list[str]) -> dict[str, int]:
    """Messages ready in each queue of ``names`` now, by a passive declare over AMQP
    (``rabbitmqctl list_queues`` shows a quorum queue's count only every few seconds)."""
    with kombu.Connection(url) as conn:
        channel = conn.default_channel
        return {name: channel.queue_declare(name, passive=True).message_count for name in names}


def restart_broker(down_s: float) -> float:
    """Stop the RabbitMQ application (every connection of every client is closed), wait
    ``down_s``, start it again and wait until it serves. Durable queues and their
    messages survive; the node's Erlang VM stays up. Returns how long it was down."""
    started = time.monotonic()
    rabbitmqctl("stop_app")
    time.sleep(down_s)
    rabbitmqctl("start_app")
    rabbitmqctl("await_startup")
    return time.monotonic() - started
