"""A batch whose job states vanished is reported as gone, never as finished (issue 17, item 4).

A Redis that keeps nothing on disk loses every batch when it restarts. The Redis here is
a redis-server of the test's own, set up that way (``appendonly no``, no save points), and
restarted with kill -9: what an out-of-memory kill or a reboot does. Nothing runs the jobs
(no worker), so before the restart the batch is plainly unfinished.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from rich.console import Console

from medq.core.errors import BatchGone
from medq.state.jobs import purge
from medq.tools.progress import wait_for_batch
from tests.helpers import MEDQ, Proc, RedisServer, free_port, run_cli, wait_http

N = 12
TOKEN = "tok-gone-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def bare_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server that keeps nothing on disk; ``restart()`` kills it (-9) and starts it
    again on the same port, empty."""
    server = RedisServer(tmp_path, "--save", "", "--appendonly", "no")
    yield server
    server.kill()


def _notes(tmp_path: Path, n: int = N) -> Path:
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps({"id": f"g{i}", "text": f"{40 + i}-year-old man, chest pain."}) + "\n"
                            for i in range(n)))
    return path


@pytest.mark.chaos  # Redis restarts under a waiting `medq enqueue --wait` process
def test_enqueue_wait_says_the_batch_is_gone_when_redis_restarts_empty(
    bare_redis: RedisServer, medq_env: dict[str, str], tmp_path: Path,
) -> None:
    env = {**medq_env, "MEDQ_REDIS_URL": bare_redis.url}
    waiter = subprocess.Popen(
        [MEDQ, "enqueue", str(_notes(tmp_path)), "--schema", "clinical_note", "--batch", "gone", "--wait",
         "--timeout-s", "60"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert waiter.stdout is not None
    assert waiter.stdout.readline().strip() == "gone"  # enqueued; the wait begins
    time.sleep(1)  # a few polls: the waiter has seen the batch unfinished
    started = time.monotonic()
    bare_redis.restart()
    _, stderr = waiter.communicate(timeout=60)
    print(f"the waiter reported the loss {time.monotonic() - started:.1f} s after the restart")

    assert waiter.returncode == 4, stderr
    said = " ".join(stderr.split())  # rich wraps long lines
    assert f"the state of {N} of its {N} job(s) is gone from Redis, so the batch is NOT finished" in said
    assert "lost when Redis restarted without persistence" in said
    assert "Redis restarted while medq waited" in said and "keeps nothing on disk" in said

    # Asked afterwards, without the waiter's memory, status and results cannot tell a gone
    # batch from one never made: they say both, with what this Redis keeps.
    for args in (["status", "gone"], ["results", "gone"]):
        res = run_cli(args, env)
        said = " ".join(res.stderr.split())
        assert res.returncode == 2 and res.stdout == "", (args, res.stderr)
        assert "no jobs in batch 'gone': never enqueued in this Redis, or its job states were purged" in said
        assert "keeps nothing on disk" in said


def test_a_wait_ends_with_gone_when_the_batch_is_purged_meanwhile(r: redis.Redis, medq_env: dict[str, str],
                                                                   tmp_path: Path) -> None:
    res = run_cli(["enqueue", str(_notes(tmp_path)), "--schema", "clinical_note", "--batch", "purged"], medq_env)
    assert res.returncode == 0, res.stderr
    polls = [0]

    def purge_on_third_poll() -> None:  # ``check`` runs once per poll
        polls[0] += 1
        if polls[0] == 3:
            purge(r, "purged")

    with pytest.raises(BatchGone) as gone:
        wait_for_batch(r, "purged", Console(quiet=True), timeout_s=30, poll_s=0.05, check=purge_on_third_poll)
    assert (gone.value.known, gone.value.left) == (N, 0)
    # never seen at all, and nothing expected: gone (or never made), not done
    with pytest.raises(BatchGone):
        wait_for_batch(r, "never-made", Console(quiet=True), timeout_s=5, poll_s=0.05)


@pytest.fixture
def api_on(start_process: Callable[..., Proc], medq_env: dict[str, str]) -> Callable[[str], str]:
    def start(redis_url: str) -> str:
        port = free_port()
        proc = start_process([MEDQ, "api", "--port", str(port)],
                             {**medq_env, "MEDQ_REDIS_URL": redis_url, "MEDQ_API__TOKENS": f"ward:{TOKEN}"}, name="api")
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/openapi.json", proc)
        return url

    return start


def test_the_api_never_calls_a_batch_with_vanished_states_done(
    bare_redis: RedisServer, api_on: Callable[[str], str], tmp_path: Path,
) -> None:
    url = api_on(bare_redis.url)
    body = _notes(tmp_path).read_text()
    r = redis.Redis(port=bare_redis.port)

    def post(batch: str) -> None:
        res = httpx.post(f"{url}/v1/batches", params={"schema": "clinical_note", "batch": batch}, headers=AUTH,
                         content=body)
        assert res.status_code == 202, res.text

    # Its job states expired (or were deleted) while the batch's owner is still known: 410, not done
    post("expired")
    assert httpx.get(f"{url}/v1/batches/expired", headers=AUTH).json()["done"] is False
    r.delete("medq:batch:expired", *r.keys("medq:job:*"))
    for path in ("/v1/batches/expired", "/v1/batches/expired/results"):
        res = httpx.get(url + path, headers=AUTH)
        assert res.status_code == 410, (path, res.text)
        assert "has no job states in Redis" in res.json()["detail"]
        assert "lost when Redis restarted without persistence" in res.json()["detail"]

    # Redis restarted empty: owner and all gone; the 404 says that this is one way to get it
    post("restarted")
    assert httpx.get(f"{url}/v1/batches/restarted", headers=AUTH).json()["done"] is False
    bare_redis.restart()
    deadline = time.monotonic() + 30
    while True:  # the API's pool reconnects on its own; a 503 meanwhile says Redis is away
        res = httpx.get(f"{url}/v1/batches/restarted", headers=AUTH)
        if res.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert res.status_code == 404, res.text
    assert res.json()["detail"].startswith("no batch 'restarted': never made by this client, or its job states were")
    assert "lost when Redis restarted without persistence" in res.json()["detail"]
