"""Budgets, exactly-once and several endpoints, through real worker processes."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from medq.core.contract import QUEUE, WATCH_KEY, job_key
from medq.core.settings import Settings
from medq.state.jobs import iter_states, job_ids
from producer.enqueue import Producer
from tests.helpers import Proc, check_first_success_kept, enqueue_wait, free_port, records, run_cli, stats, wait_settled


def _script(base_url: str, *outcomes: str) -> None:
    httpx.post(base_url.removesuffix("/v1") + "/sim/script", json={"outcomes": list(outcomes)}).raise_for_status()


def _results(env: dict[str, str], batch: str) -> list[dict]:
    return [json.loads(x) for x in run_cli(["results", batch], env).stdout.splitlines()]


def test_backpressure_does_not_spend_the_retry_budget_but_failures_do(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object], tmp_path: Path
) -> None:
    base = simulator()
    worker(base, env={"MEDQ_WORKER__MAX_RETRIES": "2", "MEDQ_LLM__FAILURE_THRESHOLD": "10"})
    one = records(tmp_path / "one.jsonl", 1)

    # Ollama's "server busy" five times and two 429s: the server is busy, the record is fine.
    _script(base, "503", "503", "503", "429", "503", "429", "503")
    assert enqueue_wait(medq_env, one, "busy") == 0
    [doc] = _results(medq_env, "busy")
    assert doc["status"] == "succeeded" and doc["attempts"] == 8

    # Three 500s with a budget of two retries: a dead letter that says why.
    _script(base, "500", "500", "500")
    assert enqueue_wait(medq_env, one, "broken") == 1
    [doc] = _results(medq_env, "broken")
    assert doc["error"]["kind"] == "server_error"
    assert "gave up after 3 failed attempts" in doc["error"]["message"]
    assert stats(base)["requests"] == 8 + 3  # one HTTP request per attempt: no SDK retries underneath


def test_a_second_delivery_of_a_running_job_does_not_run_it_again(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object], tmp_path: Path
) -> None:
    base = simulator("--latency-ms", "1500")
    worker(base)
    res = run_cli(["enqueue", str(records(tmp_path / "one.jsonl", 1)), "--schema", "clinical_note", "--batch", "dup"], medq_env)
    assert res.returncode == 0, res.stderr
    [st] = list(iter_states(r, "dup"))
    deadline = time.monotonic() + 20
    while r.hget(job_key(st.job_id), "status") != b"running" and time.monotonic() < deadline:
        time.sleep(0.05)
    # What a visibility-timeout redelivery looks like: the same job id, sent again while it runs.
    Producer(Settings(redis_url=medq_env["MEDQ_REDIS_URL"])).send([st.job_id])
    assert enqueue_wait(medq_env, tmp_path / "one.jsonl", "dup") == 0
    wait_settled(r)  # the second delivery came back after the lease and found the job done
    [doc] = _results(medq_env, "dup")
    assert doc["status"] == "succeeded" and doc["attempts"] == 1
    assert stats(base)["requests"] == 1


def test_redis_result_store_keeps_the_first_success(redis_url: str, r: redis.Redis) -> None:
    check_first_success_kept(redis_url)


def test_jobs_fail_over_from_a_dead_endpoint_and_spread_by_weight(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object], tmp_path: Path
) -> None:
    heavy, light = simulator("--latency-ms", "20"), simulator("--latency-ms", "20")
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens here
    endpoints = f"{heavy}*3,{light},{dead}"
    # caps high enough that no endpoint is ever full, from the start (no slow start from one):
    # a full one goes last, whatever its weight
    worker(heavy, env={"MEDQ_LLM__ENDPOINTS": endpoints, "MEDQ_LLM__MAX_IN_FLIGHT": "64",
                       "MEDQ_LLM__MIN_IN_FLIGHT": "64"})
    assert enqueue_wait(medq_env, records(tmp_path / "recs.jsonl", 120), "spread") == 0
    docs = _results(medq_env, "spread")
    used = Counter(d["endpoint"] for d in docs)
    assert sum(used.values()) == 120 and used[dead] == 0
    assert used[heavy] > used[light] > 10, used  # weights 3 : 1 (2.4 : 1 seen with the dead one cooling)
    shown = [json.loads(x) for x in run_cli(["endpoints", "--json"], {**medq_env, "MEDQ_LLM__ENDPOINTS": endpoints}).stdout.splitlines()]
    assert [e["url"] for e in shown] == [heavy, light, dead]
    assert shown[2]["trips"] >= 1 and shown[2]["ok"] == 0


def test_a_started_job_whose_message_was_lost_is_sent_again(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., Proc], tmp_path: Path
) -> None:
    env = {"MEDQ_WORKER__VISIBILITY_TIMEOUT_S": "2", "MEDQ_WORKER__LEASE_S": "1"}
    res = run_cli(["enqueue", str(records(tmp_path / "one.jsonl", 1)), "--schema", "clinical_note", "--batch", "orphan"],
                  {**medq_env, **env})
    assert res.returncode == 0, res.stderr
    # as if a worker had started it and died, and its message had been lost with it
    [job_id] = job_ids(r, "orphan")
    r.delete(QUEUE)
    r.hset(job_key(job_id), mapping={"status": "running", "lease_until": 0, "run_id": "gone"})
    r.zadd(WATCH_KEY, {job_id: 0})
    proc = worker(simulator(), env=env)
    deadline = time.monotonic() + 45  # untouched for 2 + 1 + 1 + 5 s, swept every ~2 s
    while r.hget(job_key(job_id), "status") != b"succeeded":
        assert time.monotonic() < deadline, proc.log[-2000:]
        time.sleep(0.5)
    assert "sent again" in proc.log
    assert r.zscore(WATCH_KEY, job_id) is None  # finished: no longer watched
    [doc] = _results(medq_env, "orphan")
    assert doc["status"] == "succeeded"
