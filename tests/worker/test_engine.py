"""The worker engine: one process keeps MAX_IN_FLIGHT requests going, and a message of
many jobs finishes each of them once, retries included. Real worker, real simulator."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from tests.helpers import run_cli

NOTE = "Patient {i} is a {age}-year-old woman with asthma on salbutamol 100 mcg."


def _records(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"r{i:03d}", "text": NOTE.format(i=i, age=20 + i % 60)}) + "\n" for i in range(n)))
    return path


def _stats(base_url: str) -> dict:
    return httpx.get(base_url.removesuffix("/v1") + "/stats").json()


def _enqueue_wait(env: dict[str, str], path: Path, batch: str) -> None:
    res = run_cli(["enqueue", str(path), "--schema", "clinical_note", "--batch", batch, "--wait", "--timeout-s", "120"], env)
    assert res.returncode == 0, res.stderr


def _results(env: dict[str, str], batch: str) -> list[dict]:
    return [json.loads(x) for x in run_cli(["results", batch], env).stdout.splitlines()]


def test_one_worker_process_keeps_max_in_flight_requests_going(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object], tmp_path: Path
) -> None:
    base = simulator("--latency-ms", "300", "--parallel", "64")
    # One process, 4 messages of 16 jobs at a time: 64 jobs on hand, 24 requests at once.
    # (One blocking call per pool thread would have kept 4 in flight.)
    worker(base, "-c", "4", env={"MEDQ_LLM__MAX_IN_FLIGHT": "24"})
    _enqueue_wait(medq_env, _records(tmp_path / "recs.jsonl", 200), "wide")
    stats = _stats(base)
    assert stats["max_in_flight"] == 24  # reached, and never more than the limit
    assert stats["requests"] == 200
    docs = _results(medq_env, "wide")
    assert len(docs) == 200 and {d["status"] for d in docs} == {"succeeded"}


def test_a_job_retried_out_of_a_many_job_message_finishes_once(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object], tmp_path: Path
) -> None:
    base = simulator()
    worker(base)
    # the first answers: a 429 and a 500 for two of the 20 jobs (one message of 16, one of 4)
    httpx.post(base.removesuffix("/v1") + "/sim/script", json={"outcomes": ["429", "500"]}).raise_for_status()
    _enqueue_wait(medq_env, _records(tmp_path / "recs.jsonl", 20), "mixed")
    docs = _results(medq_env, "mixed")
    assert sorted(d["id"] for d in docs) == [f"r{i:03d}" for i in range(20)]  # one result each
    assert {d["status"] for d in docs} == {"succeeded"}
    assert sorted(d["attempts"] for d in docs) == [1] * 18 + [2, 2]
    assert _stats(base)["requests"] == 22


def test_a_job_past_its_time_limit_is_cut_off_then_dead_lettered(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object], tmp_path: Path
) -> None:
    base = simulator("--latency-ms", "3000")
    worker(base, env={"MEDQ_WORKER__TASK_TIME_LIMIT_S": "1", "MEDQ_WORKER__MAX_RETRIES": "1"})
    res = run_cli(["enqueue", str(_records(tmp_path / "one.jsonl", 1)), "--schema", "clinical_note", "--batch", "slow",
                   "--wait", "--timeout-s", "60"], medq_env)
    assert res.returncode == 1, res.stderr  # a dead letter
    [dead] = [json.loads(x) for x in run_cli(["failed", "slow", "--json"], medq_env).stdout.splitlines()]
    assert dead["error_kind"] == "time_limit" and dead["attempts"] == 2
    assert "MEDQ_WORKER__TASK_TIME_LIMIT_S=1" in dead["error_message"]
    stats = _stats(base)
    assert stats["requests"] == 2  # each attempt cut off after its one request
    # ... and the cut closed the stream, which stopped the server's work on it (a real server
    # would otherwise go on generating an answer nobody reads, in a slot the next one needs)
    assert stats["streams"] == 2 and stats["streams_closed"] == 2 and stats["in_flight"] == 0


def test_the_time_limit_counts_from_the_first_model_call_not_the_wait_in_line(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object], tmp_path: Path
) -> None:
    base = simulator("--latency-ms", "600", "--parallel", "1")  # one request at a time, 0.6 s each
    # 8 jobs in one message, one in flight: the last waits ~4 s in line, past a 2 s limit
    worker(base, "-c", "1", env={"MEDQ_WORKER__TASK_TIME_LIMIT_S": "2", "MEDQ_LLM__MAX_IN_FLIGHT": "1"})
    _enqueue_wait(medq_env, _records(tmp_path / "line.jsonl", 8), "line")
    docs = _results(medq_env, "line")
    assert {d["status"] for d in docs} == {"succeeded"}
    assert [d["attempts"] for d in docs] == [1] * 8 and [d["deliveries"] for d in docs] == [1] * 8
    assert _stats(base)["requests"] == 8
