"""Process-level chaos: kill -9, a Redis or broker restart, faults, a shared rate limit, an endpoint outage.

Every scenario ends with the same check: every job succeeded or failed with a
kind, none lost, and `medq results` holds one result per record.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis

from medq.core.contract import JobStatus, job_key
from medq.state.jobs import iter_states
from tests.chaos.helpers import (
    KillWhileRunning,
    enqueue,
    kill_children,
    kill_group,
    outcome,
    record,
    wait_done,
    write_records,
)
from tests.helpers import MEDQ, Proc, RedisServer, free_port, run_cli, wait_http, wait_log


def sim_stats(base_url: str) -> dict[str, Any]:
    return httpx.get(base_url.removesuffix("/v1") + "/stats", timeout=5).json()


def test_kill_9_workers_and_their_children_under_load(
    r: redis.Redis, tmp_path: Path, simulator: Callable[..., str], start_worker: Callable[..., Proc], chaos_env: dict[str, str],
) -> None:
    n = 300
    base = simulator("--latency-ms", "800", "--parallel", "64")
    # Workers are killed on purpose, maybe several times during one job: not a poison job.
    # On Redis only: RabbitMQ's kill -9 leg is test_recovery's (a broker that redelivers at once
    # changes when jobs come back, not what this test counts).
    env = {**chaos_env, "MEDQ_LLM__BASE_URL": base, "MEDQ_WORKER__MAX_LOST_RUNS": "20",
           "MEDQ_LLM__MAX_IN_FLIGHT": "64"}
    threads = start_worker(env, "-c", "8", name="threads", wait=False)
    prefork = start_worker(env, "--pool", "prefork", "-c", "3", name="prefork")
    wait_log(threads, " ready.")
    enqueue(env, write_records(tmp_path / "recs.jsonl", n), "kill9")

    kills: Counter[str] = Counter()
    last = [time.monotonic()]

    def chaos(c: Counter[str]) -> None:
        nonlocal threads
        if time.monotonic() - last[0] < 2 or sum(kills.values()) >= 6:
            return
        last[0] = time.monotonic()
        if sum(kills.values()) % 2 == 0:
            kills["children"] += kill_children(prefork) > 0
        else:
            kill_group(threads)  # the main process (threads pool: the jobs die with it)
            kills["main"] += 1
            threads = start_worker(env, "-c", "8", name="threads")

    c = wait_done(r, "kill9", n, timeout_s=240, tick=chaos)
    o = outcome(r, env, "kill9", n)
    record(
        "kill -9: worker main processes and prefork children, every 2 s (Redis broker)",
        o,
        f"{kills['main']} main-process kills, {kills['children']} rounds of child kills",
    )
    assert kills["main"] >= 3 and kills["children"] >= 3, kills
    stuck = [{k.decode(): v.decode() for k, v in r.hgetall(job_key(st.job_id)).items()}
             for st in iter_states(r, "kill9") if st.status != "succeeded"]
    assert (o.succeeded, o.failed, o.lost, o.duplicated, o.results) == (n, 0, 0, 0, n), (c, o, stuck)
    assert o.rerun > 0  # the kills did hit running jobs, and those ran again


def test_poison_job_goes_to_dead_letters_after_max_lost_runs(
    r: redis.Redis, tmp_path: Path, simulator: Callable[..., str], start_worker: Callable[..., Proc], chaos_env: dict[str, str]
) -> None:
    base = simulator("--latency-ms", "800")
    env = {**chaos_env, "MEDQ_LLM__BASE_URL": base, "MEDQ_WORKER__LEASE_S": "1.5"}
    w = start_worker(env, "--pool", "prefork", "-c", "1", name="prefork")
    enqueue(env, write_records(tmp_path / "poison.jsonl", 1, prefix="poison"), "poison")
    crash = KillWhileRunning(r, next(iter_states(r, "poison")).job_id, lambda: kill_children(w))
    wait_done(r, "poison", 1, timeout_s=90, tick=crash)
    o = outcome(r, env, "poison", 1)
    failed = run_cli(["failed", "poison", "--json"], env)
    dead = [json.loads(line) for line in failed.stdout.splitlines()]
    assert [(d["record_id"], d["error_kind"]) for d in dead] == [("poison0000", "worker_lost")]
    assert "died during 3 runs" in dead[0]["error_message"]
    # The worker is fine afterwards: a normal batch goes through.
    enqueue(env, write_records(tmp_path / "after.jsonl", 5, prefix="ok"), "after-poison")
    wait_done(r, "after-poison", 5, timeout_s=60)
    after = outcome(r, env, "after-poison", 5)
    assert after.succeeded == 5
    record("poison job: its worker killed whenever it runs", o,
           f"dead letter after 3 lost runs ({len(crash.killed)} kills); next batch 5/5")
    assert (o.failed, o.lost, o.failed_kinds) == (1, 0, {"worker_lost": 1})
    assert len(crash.killed) == 3


def test_redis_restarted_under_load(
    tmp_path: Path, simulator: Callable[..., str], start_worker: Callable[..., Proc], chaos_env: dict[str, str], private_redis: Any
) -> None:
    n = 200
    rr = redis.Redis.from_url(private_redis.url)
    base = simulator("--latency-ms", "300", "--parallel", "64")
    env = {**chaos_env, "MEDQ_REDIS_URL": private_redis.url, "MEDQ_LLM__BASE_URL": base}
    w1 = start_worker(env, "-c", "8", name="w1", wait=False)
    start_worker(env, "-c", "8", name="w2")
    wait_log(w1, " ready.")
    enqueue(env, write_records(tmp_path / "recs.jsonl", n), "redis-restart")
    restarted = [False]

    def restart_once(c: Counter[str]) -> None:
        if not restarted[0] and c[JobStatus.SUCCEEDED.value] >= 40:
            restarted[0] = True
            private_redis.stop()
            time.sleep(3)
            private_redis.start()

    wait_done(rr, "redis-restart", n, timeout_s=180, tick=restart_once)
    o = outcome(rr, env, "redis-restart", n)
    record("Redis stopped for 3 s and restarted (append-only file) under load", o)
    assert restarted[0]
    assert (o.succeeded, o.failed, o.lost, o.duplicated, o.results) == (n, 0, 0, 0, n), o


def test_broker_restart_mid_batch(
    restartable_broker: Any,  # first: made before the workers start, removed after they stop
    r: redis.Redis, tmp_path: Path, simulator: Callable[..., str], start_worker: Callable[..., Proc],
    chaos_env: dict[str, str],
) -> None:
    """The broker alone restarts while jobs run (job state stays up in Redis): the
    workers reconnect, the messages they held come back (RabbitMQ: at once, from the
    quorum queue; Redis: after the visibility timeout) and none runs twice."""
    n = 200
    b = restartable_broker
    base = simulator("--latency-ms", "300", "--parallel", "64")
    env = {**chaos_env, **b.env, "MEDQ_LLM__BASE_URL": base}
    w1 = start_worker(env, "-c", "8", name="w1", wait=False)
    start_worker(env, "-c", "8", name="w2")
    wait_log(w1, " ready.")
    enqueue(env, write_records(tmp_path / "recs.jsonl", n), "broker-restart")
    down: list[tuple[int, float]] = []  # (jobs done when it went down, seconds down)

    def restart_once(c: Counter[str]) -> None:
        if not down and c[JobStatus.SUCCEEDED.value] >= 40:
            done = c[JobStatus.SUCCEEDED.value] + c[JobStatus.FAILED.value]
            down.append((done, b.restart(3)))

    started = time.monotonic()
    wait_done(r, "broker-restart", n, timeout_s=180, tick=restart_once)
    took_s = time.monotonic() - started
    o = outcome(r, env, "broker-restart", n)
    record(f"{b.name} broker stopped for 3 s and restarted mid-batch (job state in Redis stays up)", o,
           f"down {down[0][1]:.1f} s after {down[0][0]} of {n} jobs; batch done in {took_s:.0f} s" if down else "")
    assert down and down[0][0] < n  # it went down mid-batch
    assert (o.succeeded, o.failed, o.lost, o.duplicated, o.results) == (n, 0, 0, 0, n), o


def test_faults_at_ten_percent(
    r: redis.Redis, tmp_path: Path, simulator: Callable[..., str], start_worker: Callable[..., Proc], chaos_env: dict[str, str]
) -> None:
    n = 200
    faults = "429:0.02,500:0.02,503:0.02,timeout:0.01,malformed:0.02,truncated:0.01"
    base = simulator("--latency-ms", "50", "--parallel", "64", "--fault", faults, "--seed", "4")
    env = {**chaos_env, "MEDQ_LLM__BASE_URL": base, "MEDQ_LLM__TIMEOUT_S": "2"}
    w1 = start_worker(env, "-c", "8", name="w1", wait=False)
    start_worker(env, "-c", "8", name="w2")
    wait_log(w1, " ready.")
    enqueue(env, write_records(tmp_path / "recs.jsonl", n), "faults")
    wait_done(r, "faults", n, timeout_s=180)
    o = outcome(r, env, "faults", n)
    stats = sim_stats(base)
    faults_seen = {k: v for k, v in stats["outcomes"].items() if k != "ok"}
    record("simulator faults at 10 % (429, 500, 503, timeout, malformed, truncated)", o,
           f"{stats['requests']} requests; faults served: {json.dumps(faults_seen, sort_keys=True)}")
    assert o.lost == 0 and o.duplicated == 0 and o.results == n
    assert o.succeeded + o.failed == n
    assert all(kind != "?" for kind in o.failed_kinds)  # every failure says why
    assert sum(faults_seen.values()) >= 0.05 * stats["requests"]  # the faults really happened


def max_per_window(arrivals: list[float], window_s: float = 60.0) -> int:
    xs = sorted(arrivals)
    best, j = 0, 0
    for i, x in enumerate(xs):
        while xs[j] <= x - window_s:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_four_workers_share_one_rate_limit_and_in_flight_cap(
    tmp_path: Path, simulator: Callable[..., str], start_worker: Callable[..., Proc], chaos_env: dict[str, str],
    own_redis: RedisServer,
) -> None:
    n, rpm, cap = 180, 120, 4
    base = simulator("--latency-ms", "300", "--parallel", "64")
    # A Redis of the test's own: its command counts below are the workers' alone, not those
    # of tests running beside it (pytest-xdist) on other databases of the shared server.
    r = redis.Redis.from_url(own_redis.url)
    env = {
        **chaos_env,
        "MEDQ_REDIS_URL": own_redis.url,
        "MEDQ_LLM__BASE_URL": base,
        "MEDQ_LLM__REQUESTS_PER_MIN": str(rpm),
        "MEDQ_LLM__MAX_IN_FLIGHT": str(cap),
        # Jobs put back for the next minute wait in their worker: let them wait that long.
        "MEDQ_WORKER__RETRY_BACKOFF_MAX_S": "30",
        "MEDQ_WORKER__VISIBILITY_TIMEOUT_S": "120",
    }
    for w in [start_worker(env, "-c", "4", name=f"w{i}", wait=False) for i in range(4)]:
        wait_log(w, " ready.")
    enqueue(env, write_records(tmp_path / "recs.jsonl", n), "ratelimit")
    held: list[tuple[float, int]] = []  # (time, scripts run so far) while the limit holds jobs back

    def watch_the_wait(c: Counter[str]) -> None:
        # Every try of a job runs scripts (start the job, take a lease); the test's own
        # polling runs none, so script calls count the workers' tries.
        if c[JobStatus.SUCCEEDED.value] >= rpm and len(held) < 2:
            if not held or time.monotonic() - held[0][0] >= 30:
                calls = int(r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
                held.append((time.monotonic(), calls))

    wait_done(r, "ratelimit", n, timeout_s=200, tick=watch_the_wait)
    o = outcome(r, env, "ratelimit", n)
    stats = sim_stats(base)
    busiest = max_per_window(stats["arrivals"])
    span = max(stats["arrivals"]) - min(stats["arrivals"])
    per_s = (held[1][1] - held[0][1]) / (held[1][0] - held[0][0])
    record(f"4 workers x 4 messages, limit {rpm} requests/min, {cap} in flight", o,
           f"busiest 60 s window {busiest} requests; max in flight {stats['max_in_flight']}; "
           f"{stats['requests']} requests over {span:.0f} s; "
           f"{per_s:.1f} limiter/job scripts per s while {n - rpm} jobs waited for the next minute")
    assert (o.succeeded, o.lost, o.duplicated) == (n, 0, 0), o
    assert busiest <= rpm, busiest
    assert stats["max_in_flight"] <= cap, stats["max_in_flight"]
    assert span >= 60  # the limit, not the workers, set the pace
    # Waiting jobs are put back with a countdown, not polled for: 16 threads spinning on
    # the limiter would run hundreds of scripts a second.
    assert per_s < 30, per_s


DOWN_S = 10  # several cool-downs (2 s, then doubling) fit in it


def test_endpoint_down_for_a_while_then_back(
    r: redis.Redis, tmp_path: Path, start_process: Callable[..., Proc], start_worker: Callable[..., Proc], chaos_env: dict[str, str]
) -> None:
    n = 100
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"

    def start_sim() -> Proc:
        proc = start_process([MEDQ, "llm", "simulate", "--port", str(port), "--latency-ms", "200", "--parallel", "64"],
                             chaos_env, name="simulator")
        wait_http(f"{base}/models", proc)
        return proc

    sim = start_sim()
    env = {**chaos_env, "MEDQ_LLM__BASE_URL": base}
    w1 = start_worker(env, "-c", "8", name="w1", wait=False)
    start_worker(env, "-c", "8", name="w2")
    wait_log(w1, " ready.")
    enqueue(env, write_records(tmp_path / "recs.jsonl", n), "outage")
    down_at: list[float] = []

    def outage(c: Counter[str]) -> None:
        nonlocal sim
        if not down_at and c[JobStatus.SUCCEEDED.value] >= 15:
            sim.stop()
            down_at.append(time.monotonic())
        elif len(down_at) == 1 and time.monotonic() - down_at[0] >= DOWN_S:
            sim = start_sim()
            down_at.append(time.monotonic())

    wait_done(r, "outage", n, timeout_s=180, tick=outage)
    o = outcome(r, env, "outage", n)
    ep = json.loads(run_cli(["endpoints", "--json"], env).stdout)
    record(f"the endpoint down for {DOWN_S} s, then back", o, f"endpoint cooled down {ep['trips']} times while it was down")
    assert len(down_at) == 2 and down_at[1] - down_at[0] >= DOWN_S
    assert (o.succeeded, o.failed, o.lost, o.duplicated) == (n, 0, 0, 0), o
    assert ep["trips"] >= 1  # the breaker held the workers off instead of hammering the port
