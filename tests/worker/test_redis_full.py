"""A full Redis (``maxmemory``, ``noeviction``): nothing dies, nothing is lost.

Each test runs a redis-server of its own on a free port (never the shared one), fills it
to its ``maxmemory``, and frees it again with CONFIG SET."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import Proc, private_redis, run_cli


@pytest.fixture
def small_redis(tmp_path: Path) -> Iterator[redis.Redis]:
    """redis-server on a free port, no persistence, ``noeviction`` (as the README asks)."""
    with private_redis(tmp_path, "--maxmemory-policy", "noeviction") as port:
        client = redis.Redis(port=port, decode_responses=True)
        yield client
        client.close()


def fill(client: redis.Redis, room_bytes: int = 0) -> None:
    """Set maxmemory to what Redis uses now plus ``room_bytes`` (0: full now)."""
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", max(used + room_bytes, 1))


def write_notes(path: Path, n: int, size: int = 2000) -> Path:
    line = "Patient reports cough and fever. "
    path.write_text("".join(
        json.dumps({"id": f"n{i}", "text": f"{30 + i}-year-old man. " + line * (size // len(line))}) + "\n"
        for i in range(n)
    ))
    return path


def wait_succeeded(client: redis.Redis, env: dict[str, str], batch: str, n: int, proc: Proc, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.popen.poll() is None, f"worker exited:\n{proc.log[-3000:]}"
        res = run_cli(["status", batch, "--json"], env)
        if res.returncode == 0 and json.loads(res.stdout).get("succeeded") == n:
            return
        time.sleep(1)
    raise TimeoutError(f"batch {batch} not done: {run_cli(['status', batch, '--json'], env).stdout}\n{proc.log[-3000:]}")


def test_enqueue_into_a_full_redis_fails_cleanly_and_a_rerun_sends_the_rest(
    small_redis: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str],
    worker_process: Callable[..., Proc], tmp_path: Path,
) -> None:
    env = {**medq_env, "MEDQ_REDIS_URL": f"redis://127.0.0.1:{small_redis.connection_pool.connection_kwargs['port']}/0"}
    notes = write_notes(tmp_path / "notes.jsonl", 30, size=8000)
    fill(small_redis, room_bytes=210_000)  # room for some of the 30 notes, not all

    res = run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "full"], env)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert "Redis is full (maxmemory" in res.stderr
    assert "run the same command again" in res.stderr and "job(s) of batch full were enqueued" in res.stderr
    written = small_redis.scard("medq:batch:full")
    assert 0 < written < 30  # some jobs were written before it filled, and none of them was sent

    small_redis.config_set("maxmemory", 0)
    proc = worker_process(simulator(), env={"MEDQ_REDIS_URL": env["MEDQ_REDIS_URL"]})
    res = run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "full"], env)
    assert res.returncode == 0, res.stderr
    # the jobs written by the first run are sent by the second, or they would never run
    wait_succeeded(small_redis, env, "full", 30, proc)


def test_a_running_worker_waits_while_redis_is_full_and_finishes_after(
    small_redis: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str],
    worker_process: Callable[..., Proc], tmp_path: Path,
) -> None:
    env = {**medq_env, "MEDQ_REDIS_URL": f"redis://127.0.0.1:{small_redis.connection_pool.connection_kwargs['port']}/0",
           "MEDQ_JOBS_PER_MESSAGE": "2"}
    proc = worker_process(simulator("--latency-ms", "1500"), env=env)
    notes = write_notes(tmp_path / "notes.jsonl", 16, size=200)
    assert run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "busy"], env).returncode == 0
    deadline = time.monotonic() + 60
    while not small_redis.hlen("unacked") and time.monotonic() < deadline:  # the worker has taken messages
        time.sleep(0.1)
    fill(small_redis)  # full while jobs run and messages wait in the queue

    wait_log_count(proc, "Redis is full (maxmemory", 2)
    time.sleep(5)
    assert proc.popen.poll() is None, proc.log[-3000:]
    assert "Unrecoverable error" not in proc.log

    small_redis.config_set("maxmemory", 0)
    wait_succeeded(small_redis, env, "busy", 16, proc)
    assert "Unrecoverable error" not in proc.log


def wait_log_count(proc: Proc, needle: str, n: int, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while proc.log.count(needle) < n and time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise AssertionError(f"worker exited:\n{proc.log[-3000:]}")
        time.sleep(0.2)
    assert proc.log.count(needle) >= n, proc.log[-3000:]
