"""Redis killed (-9) mid-batch with the production persistence: ``appendonly yes``,
``appendfsync everysec`` (issue 17, item 4).

With ``everysec`` Redis write(2)s each write to its append-only file before it answers
the client, and fsyncs once a second. kill -9 of redis-server alone therefore loses
nothing: what was written is in the kernel's page cache, which outlives the process.
The second that ``everysec`` may lose is lost only when the machine goes down with the
process (power, kernel panic, a VM killed): what was written but not yet fsynced. That
crash is played here by cutting the append-only file back to where it stood one second
before the kill, then starting Redis on it: Redis comes back as it was one second earlier,
with every write after that point gone, and the workers, the waiter and the producer
still believing what they were told in that second.

Scenarios:

1. kill -9 under load: nothing lost, nothing run twice.
2. kill -9 and the last second lost, under load: Redis is a consistent earlier copy of
   itself (the file is a prefix), so job states and messages went back together; jobs
   that had finished run again or are found finished, none is lost or doubled.
3. kill -9 and the last second lost right after `medq enqueue` said it had enqueued the
   batch: jobs the producer reported are gone. The waiter (`enqueue --wait`) says so and
   never reports the batch done; the same command run again enqueues what is missing.
4. For comparison, a Redis without persistence killed mid-batch: everything is gone, the
   waiter says so, the workers stay up, and the same command run again runs it all.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from medq.core.contract import JobStatus, job_key
from medq.state.jobs import counts, iter_states
from tests.chaos.helpers import enqueue, outcome, record, wait_done, write_records
from tests.helpers import MEDQ, Proc, RedisServer, run_cli, wait_log


class AofRedis(RedisServer):
    """A redis-server with the production persistence (append-only file, fsync every
    second, no snapshots), or with ``persist=False`` none at all. ``kill9(lose_s)`` kills
    it and, with ``lose_s``, cuts its append-only file back to its length ``lose_s`` before
    the kill (a machine crash: the writes not yet fsynced are gone); ``start()`` brings it
    back on the same port."""

    def __init__(self, tmp_path: Path, persist: bool = True) -> None:
        self.sizes: list[tuple[float, int]] = []  # (monotonic time, size of the incr file)
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        # no rewrite during the test: the incr file only grows, so a length is a point in time
        super().__init__(tmp_path / "redis", "--appendonly", "yes" if persist else "no", "--appendfsync", "everysec",
                         "--save", "", "--auto-aof-rewrite-percentage", "0")
        self._sampler.start()

    def incr_file(self) -> Path:
        files = sorted((self.dir / "appendonlydir").glob("*.incr.aof"))
        assert len(files) == 1, files
        return files[0]

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.sizes.append((time.monotonic(), self.incr_file().stat().st_size))
            except (AssertionError, OSError):
                pass
            time.sleep(0.02)

    def kill9(self, lose_s: float = 0.0) -> int:
        """kill -9; with ``lose_s``, the writes of its last ``lose_s`` seconds are lost. Returns
        the bytes of append-only file cut off."""
        assert self.proc is not None
        killed_at = time.monotonic()
        self.proc.kill()
        self.proc.wait(10)
        if not lose_s:
            return 0
        path = self.incr_file()
        keep = max((size for t, size in self.sizes if t <= killed_at - lose_s), default=0)
        cut = path.stat().st_size - keep
        with open(path, "r+b") as fh:
            fh.truncate(keep)
        return cut

    def close(self) -> None:
        self._stop.set()
        self.kill()


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[AofRedis]:
    server = AofRedis(tmp_path)
    yield server
    server.close()


@pytest.fixture
def bare_redis(tmp_path: Path) -> Iterator[AofRedis]:
    server = AofRedis(tmp_path, persist=False)
    yield server
    server.close()


def _llm_requests(base_url: str) -> int:
    return int(httpx.get(base_url.removesuffix("/v1") + "/stats", timeout=5).json()["requests"])


def _run_with_kill(
    aof_redis: AofRedis, tmp_path: Path, simulator: Callable[..., str], start_worker: Callable[..., Proc],
    chaos_env: dict[str, str], batch: str, lose_s: float,
) -> tuple[Any, dict[str, Any]]:
    """200 jobs on two workers; Redis killed (and with ``lose_s`` rolled back) once 40 have succeeded."""
    n = 200
    rr = redis.Redis.from_url(aof_redis.url)
    base = simulator("--latency-ms", "300", "--parallel", "64")
    env = {**chaos_env, "MEDQ_REDIS_URL": aof_redis.url, "MEDQ_LLM__BASE_URL": base}
    w1 = start_worker(env, "-c", "8", name="w1", wait=False)
    start_worker(env, "-c", "8", name="w2")
    wait_log(w1, " ready.")
    enqueue(env, write_records(tmp_path / "recs.jsonl", n), batch)
    seen: dict[str, Any] = {}

    def kill_once(c: Counter[str]) -> None:
        if not seen and c[JobStatus.SUCCEEDED.value] >= 40:
            seen["before"] = c[JobStatus.SUCCEEDED.value]
            seen["cut_bytes"] = aof_redis.kill9(lose_s)
            aof_redis.start()
            seen["after"] = counts(rr, batch)[JobStatus.SUCCEEDED.value]

    started = time.monotonic()
    wait_done(rr, batch, n, timeout_s=180, tick=kill_once)
    seen["took_s"] = time.monotonic() - started
    seen["llm_requests"] = _llm_requests(base)
    return outcome(rr, env, batch, n), seen


def test_redis_killed_mid_batch_with_aof_everysec(
    aof_redis: AofRedis, tmp_path: Path, simulator: Callable[..., str], start_worker: Callable[..., Proc],
    chaos_env: dict[str, str],
) -> None:
    o, seen = _run_with_kill(aof_redis, tmp_path, simulator, start_worker, chaos_env, "aof-kill9", lose_s=0)
    record("Redis kill -9 mid-batch (appendonly yes, appendfsync everysec)", o,
           f"killed after {seen['before']} succeeded, {seen['after']} after restart; "
           f"{seen['llm_requests']} LLM requests; batch done in {seen['took_s']:.0f} s")
    assert seen["after"] >= seen["before"]  # the process crash lost no write
    assert (o.succeeded, o.failed, o.lost, o.duplicated, o.results) == (o.jobs, 0, 0, 0, o.jobs), o


def test_redis_killed_and_its_last_second_lost_mid_batch(
    aof_redis: AofRedis, tmp_path: Path, simulator: Callable[..., str], start_worker: Callable[..., Proc],
    chaos_env: dict[str, str],
) -> None:
    o, seen = _run_with_kill(aof_redis, tmp_path, simulator, start_worker, chaos_env, "aof-lost-second", lose_s=1.0)
    went_back = seen["before"] - seen["after"]
    record("Redis kill -9 mid-batch and its last second lost (machine crash, appendfsync everysec)", o,
           f"{seen['cut_bytes']} bytes of AOF lost; succeeded {seen['before']} -> {seen['after']} after restart; "
           f"{seen['llm_requests']} LLM requests for {o.jobs} jobs; batch done in {seen['took_s']:.0f} s")
    print(f"lost second: {seen}; {went_back} job(s) went back from succeeded; rerun {o.rerun}")
    assert seen["cut_bytes"] > 0  # writes were really lost
    assert (o.succeeded, o.failed, o.lost, o.duplicated, o.results) == (o.jobs, 0, 0, 0, o.jobs), o


def test_jobs_enqueued_in_the_lost_second_are_reported_and_enqueued_again(
    aof_redis: AofRedis, tmp_path: Path, simulator: Callable[..., str], start_worker: Callable[..., Proc],
    chaos_env: dict[str, str],
) -> None:
    n = 3000
    rr = redis.Redis.from_url(aof_redis.url)
    base = simulator("--latency-ms", "20", "--parallel", "64")
    env = {**chaos_env, "MEDQ_REDIS_URL": aof_redis.url, "MEDQ_LLM__BASE_URL": base}
    recs = write_records(tmp_path / "recs.jsonl", n)
    args = ["enqueue", str(recs), "--schema", "clinical_note", "--batch", "lost-enqueue", "--wait", "--timeout-s", "60"]
    # no worker yet: the waiter waits on a batch that cannot finish before the crash
    waiter = subprocess.Popen([MEDQ, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert waiter.stdout is not None
    assert waiter.stdout.readline().strip() == "lost-enqueue"  # medq enqueue: "n jobs"; the wait begins
    # The crash half a second after the enqueue returned. medq enqueues ~10 000 jobs/s, so the
    # second lost holds all of it; in a longer enqueue, its end (a prefix of the file survives:
    # the jobs enqueued first keep their states and their messages).
    time.sleep(0.5)
    cut = aof_redis.kill9(lose_s=1.0)
    aof_redis.start()
    states = Counter(st.status for st in iter_states(rr, "lost-enqueue"))
    unsent = sum(1 for st in iter_states(rr, "lost-enqueue") if rr.hget(job_key(st.job_id), "sent") is None)
    queued_msgs = rr.llen("medq")
    _, stderr = waiter.communicate(timeout=120)
    said = " ".join(stderr.split())
    print(f"after the lost second ({cut} bytes): {sum(states.values())} of {n} job states, {unsent} never marked "
          f"sent, {queued_msgs} messages queued; the waiter exited {waiter.returncode}: {said[-400:]}")

    # The waiter never calls it done: it says the states are gone (exit 4), or, if every
    # state survived but messages did not, it times out (exit 3) with jobs unfinished.
    assert waiter.returncode in (3, 4), said
    if sum(states.values()) < n:
        assert waiter.returncode == 4 and f"of its {n} job(s) is gone from Redis" in said
    # The same command again puts back what is missing; with a worker, all of it runs.
    start_worker(env, "-c", "8")
    again = run_cli(args[:-2] + ["--timeout-s", "180"], env, timeout_s=240)
    assert again.returncode == 0, again.stderr
    o = outcome(rr, env, "lost-enqueue", n)
    record("Redis kill -9 and its last second lost right after `medq enqueue` (machine crash, everysec)", o,
           f"{n - sum(states.values())} of {n} enqueued jobs lost with the second, {unsent} states left unsent; "
           f"`enqueue --wait` exit {waiter.returncode} (never 0); the same enqueue again: all {o.succeeded} succeeded")
    assert (o.succeeded, o.failed, o.lost, o.duplicated, o.results) == (n, 0, 0, 0, n), o


def test_redis_without_persistence_killed_mid_batch(
    bare_redis: AofRedis, tmp_path: Path, simulator: Callable[..., str], start_worker: Callable[..., Proc],
    chaos_env: dict[str, str],
) -> None:
    n = 200
    rr = redis.Redis.from_url(bare_redis.url)
    base = simulator("--latency-ms", "300", "--parallel", "64")
    env = {**chaos_env, "MEDQ_REDIS_URL": bare_redis.url, "MEDQ_LLM__BASE_URL": base}
    w1 = start_worker(env, "-c", "8", name="w1", wait=False)
    w2 = start_worker(env, "-c", "8", name="w2")
    wait_log(w1, " ready.")
    args = ["enqueue", str(write_records(tmp_path / "recs.jsonl", n)), "--schema", "clinical_note",
            "--batch", "no-aof", "--wait", "--timeout-s", "120"]
    waiter = subprocess.Popen([MEDQ, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while (done := counts(rr, "no-aof")[JobStatus.SUCCEEDED.value]) < 40:
        assert time.monotonic() < deadline, "no job succeeded"
        time.sleep(0.1)
    bare_redis.kill9()
    bare_redis.start()
    _, stderr = waiter.communicate(timeout=120)
    said = " ".join(stderr.split())
    assert waiter.returncode == 4, said
    assert f"the state of {n} of its {n} job(s) is gone from Redis, so the batch is NOT finished" in said
    assert "Redis restarted while medq waited" in said and "keeps nothing on disk" in said
    assert w1.popen.poll() is None and w2.popen.poll() is None  # the workers stay up
    requests_before = _llm_requests(base)

    again = run_cli(args[:-2] + ["--timeout-s", "180"], env, timeout_s=240)
    assert again.returncode == 0, again.stderr
    o = outcome(rr, env, "no-aof", n)
    requests = _llm_requests(base)
    record("Redis without persistence kill -9 mid-batch; the same enqueue run again", o,
           f"killed after {done} succeeded: every state, note, message and result gone; `enqueue --wait` exit 4 "
           f"naming the loss; re-enqueued, {requests - requests_before} more LLM requests ({requests} for {n} jobs)")
    assert (o.succeeded, o.failed, o.lost, o.duplicated, o.results) == (n, 0, 0, 0, n), o
