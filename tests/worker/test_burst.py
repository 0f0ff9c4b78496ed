"""`medq worker --burst [BATCH]`: a real worker that stops by itself once the batch (or the
whole queue) has nothing queued, running or retrying, saying how it ended, on Redis and on
RabbitMQ; and the same runner in this process (``worker.burst.run_burst``), which the
rest of the suite drains its jobs with."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from medq.state.jobs import counts
from tests.helpers import MEDQ, REPO, drain, records, run_cli, wait_until
from tests.rabbitmq import own_vhost, skip_unless_rabbitmq


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_env(request: pytest.FixtureRequest, medq_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """``medq_env`` on Redis (the default broker), or on a RabbitMQ vhost of the test's own."""
    if request.param == "redis":
        yield medq_env
        return
    skip_unless_rabbitmq()
    with own_vhost() as (_, url):
        yield {**medq_env, "MEDQ_BROKER_URL": url}


def _enqueue(env: dict[str, str], path: Path, batch: str) -> None:
    res = run_cli(["enqueue", str(path), "--schema", "clinical_note", "--batch", batch], env)
    assert res.returncode == 0, res.stderr


def _burst(env: dict[str, str], *args: str, timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    """``medq worker --burst ...`` as a real process, started without mingle and gossip."""
    return run_cli(["worker", "--burst", *args, "--", "--without-mingle", "--without-gossip"], env,
                   timeout_s=timeout_s, process=True)


def _results(env: dict[str, str], batch: str) -> list[dict]:
    return [json.loads(line) for line in run_cli(["results", batch], env).stdout.splitlines()]


def test_burst_exits_0_once_all_200_records_have_results(
    broker_env: dict[str, str], r: redis.Redis, simulator_process: Callable[..., str], tmp_path: Path
) -> None:
    env = {**broker_env, "MEDQ_LLM__BASE_URL": simulator_process("--latency-ms", "20")}
    _enqueue(env, records(tmp_path / "notes.jsonl", 200), "nightly")
    res = _burst(env, "nightly", "-c", "8")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "batch nightly drained: 200 succeeded" in res.stdout + res.stderr
    docs = _results(env, "nightly")
    assert len(docs) == 200 and all(d["status"] == "succeeded" for d in docs)


def test_burst_against_a_failing_endpoint_exits_1_once_every_job_is_a_dead_letter(
    broker_env: dict[str, str], r: redis.Redis, simulator_process: Callable[..., str], tmp_path: Path
) -> None:
    env = {**broker_env, "MEDQ_LLM__BASE_URL": simulator_process("--fault", "500:1"),
           "MEDQ_WORKER__MAX_RETRIES": "1",
           # every failure is the record's: the endpoint is never cooled, so no job waits for it
           "MEDQ_LLM__FAILURE_THRESHOLD": "100000"}
    _enqueue(env, records(tmp_path / "notes.jsonl", 40), "broken")
    res = _burst(env, "broken", "-c", "8")
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-3000:]
    assert "batch broken drained: 40 failed; see `medq failed broken`" in out
    assert {d["error"]["kind"] for d in _results(env, "broken")} == {"server_error"}


def test_burst_without_a_batch_drains_the_whole_queue(
    r: redis.Redis, medq_env: dict[str, str], simulator_process: Callable[..., str], tmp_path: Path
) -> None:
    env = {**medq_env, "MEDQ_LLM__BASE_URL": simulator_process()}
    _enqueue(env, records(tmp_path / "a.jsonl", 30), "a")
    _enqueue(env, records(tmp_path / "b.jsonl", 30), "b")
    res = _burst(env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "the queue drained" in res.stdout + res.stderr
    assert counts(r, "a")["succeeded"] == counts(r, "b")["succeeded"] == 30


@pytest.mark.e2e  # a real `medq worker --burst` process
def test_burst_of_a_batch_that_has_no_jobs_exits_4(r: redis.Redis, medq_env: dict[str, str]) -> None:
    res = _burst({**medq_env, "MEDQ_LLM__BASE_URL": "http://127.0.0.1:9/v1"}, "never-enqueued")
    assert res.returncode == 4
    assert "batch never-enqueued: no job states" in res.stdout + res.stderr


def test_burst_stopped_by_a_signal_before_the_batch_is_done_exits_3(
    r: redis.Redis, medq_env: dict[str, str], simulator_process: Callable[..., str], tmp_path: Path
) -> None:
    env = {**medq_env, "MEDQ_LLM__BASE_URL": simulator_process("--latency-ms", "500", "--parallel", "1")}
    _enqueue(env, records(tmp_path / "notes.jsonl", 20), "cut")
    proc = subprocess.Popen([MEDQ, "worker", "--burst", "cut", "-c", "2", "--", "--without-mingle", "--without-gossip"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: counts(r, "cut")["succeeded"] > 0, timeout_s=60)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, out[-3000:]
    assert "stopped before batch cut was drained" in out
    assert counts(r, "cut")["succeeded"] < 20  # it did stop early: the rest waits for the next run


def test_the_in_process_runner_drains_a_batch_with_retries_and_says_how_it_ended(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], tmp_path: Path
) -> None:
    base = simulator()
    env = {**medq_env, "MEDQ_LLM__BASE_URL": base, "MEDQ_WORKER__MAX_RETRIES": "1"}
    # the first two requests fail: one job (or two) is retried with a countdown, none lost
    httpx.post(base.removesuffix("/v1") + "/sim/script", json={"outcomes": ["500", "503"]}).raise_for_status()
    _enqueue(env, records(tmp_path / "notes.jsonl", 50), "inproc")
    started = time.monotonic()
    report = drain(env, "inproc")
    assert report.exit_code == 0 and report.counts["succeeded"] == 50, report.describe()
    assert report.describe() == "batch inproc drained: 50 succeeded"
    assert sorted(d["attempts"] for d in _results(env, "inproc"))[-1] >= 2
    print(f"50 records with retries drained in process in {time.monotonic() - started:.1f}s")
