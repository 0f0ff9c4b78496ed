"""A schema rollout across a mixed fleet: one worker with an old schema folder (without the
job's schema, or without its version) beside one that has it.

Jobs of the new schema all run on the capable worker, each asked of the model once, and
handed on at most once by the old worker (deliveries close to attempts); with no capable
worker alive they fail at once, saying which schema and version and what to do, and plain
``medq requeue`` runs them once a capable worker is up."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import redis.asyncio

from medq.state import fleet
from tests.helpers import InProcessWorker, Proc, run_cli

V1 = """name: lab_report
version: 1
fields:
  hba1c_pct: {type: [number, "null"], description: HbA1c in percent.}
  egfr: {type: [integer, "null"], description: eGFR.}
"""
V2 = V1.replace("version: 1", "version: 2") + "  potassium_mmol_l: {type: [number, \"null\"], description: Potassium.}\n"

JOBS = 12


def _folder(path: Path, **files: str) -> str:
    path.mkdir()
    for name, body in files.items():
        (path / f"{name}.yaml").write_text(body, encoding="utf-8")
    return str(path)


def _notes(tmp_path: Path) -> Path:
    notes = tmp_path / "labs.jsonl"
    notes.write_text("".join(json.dumps({"id": f"r{i}", "text": f"HbA1c 7.{i} %, eGFR 6{i}."}) + "\n"
                             for i in range(JOBS)), encoding="utf-8")
    return notes


def _docs(env: dict[str, str], batch: str) -> list[dict]:
    res = run_cli(["results", batch], env)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


# What the old worker's folder lacks: the schema's name (only the bundled schemas), or the
# job's version (lab_report v1 only, while the producer and the capable worker have v2).
OLD_FOLDERS = {"without the name": {}, "without the version": {"lab_report": V1}}


@pytest.mark.parametrize("lacks", OLD_FOLDERS)
def test_new_schema_jobs_all_run_on_the_capable_worker(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str],
    worker: Callable[..., InProcessWorker], tmp_path: Path, lacks: str,
) -> None:
    old_dir = _folder(tmp_path / "old", **OLD_FOLDERS[lacks])
    new_dir = _folder(tmp_path / "new", lab_report=V2)
    base_url = simulator("--latency-ms", "100")
    env = {**medq_env, "MEDQ_JOBS_PER_MESSAGE": "1"}  # a message per job: both workers take some
    old = worker(base_url, "-c", "2", env={**env, "MEDQ_SCHEMAS_DIRS": old_dir})
    worker(base_url, "-c", "2", env={**env, "MEDQ_SCHEMAS_DIRS": new_dir})

    t0 = time.monotonic()
    res = run_cli(["enqueue", str(_notes(tmp_path)), "--schema", "lab_report", "--batch", "labs",
                   "--wait", "--timeout-s", "60"], {**env, "MEDQ_SCHEMAS_DIRS": new_dir})
    took_s = time.monotonic() - t0
    assert res.returncode == 0, res.stderr

    docs = _docs(env, "labs")
    assert len(docs) == JOBS and all(d["status"] == "succeeded" for d in docs)
    assert all(d["schema_version"] == 2 and "potassium_mmol_l" in d["data"] for d in docs)
    # asked of the model once each; handed on by the old worker at most once, never bounced
    assert [d["attempts"] for d in docs] == [1] * JOBS
    assert all(d["deliveries"] <= 2 for d in docs), [d["deliveries"] for d in docs]
    assert "handed on to medq.schema.lab_report.v2" in old.log  # the old worker did take some
    print(f"{JOBS} jobs in {took_s:.1f}s; deliveries {sorted(d['deliveries'] for d in docs)}")


def test_with_no_capable_worker_jobs_fail_clearly_and_requeue_runs_them_once_one_is_up(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str],
    worker: Callable[..., InProcessWorker], tmp_path: Path,
) -> None:
    old_dir = _folder(tmp_path / "old", lab_report=V1)
    new_dir = _folder(tmp_path / "new", lab_report=V2)
    base_url = simulator()
    producer_env = {**medq_env, "MEDQ_SCHEMAS_DIRS": new_dir}
    worker(base_url, env={**medq_env, "MEDQ_SCHEMAS_DIRS": old_dir})

    t0 = time.monotonic()
    res = run_cli(["enqueue", str(_notes(tmp_path)), "--schema", "lab_report", "--batch", "labs",
                   "--wait", "--timeout-s", "60"], producer_env)
    assert res.returncode == 1, res.stderr  # done, with dead letters: not left bouncing
    print(f"{JOBS} jobs failed in {time.monotonic() - t0:.1f}s")

    failed = [json.loads(line) for line in run_cli(["failed", "labs", "--json"], producer_env).stdout.splitlines()]
    assert len(failed) == JOBS
    for job in failed:
        assert job["error_kind"] == "schema_unavailable"
        msg = job["error_message"]
        assert "schema lab_report version 2 is not loaded in any live worker" in msg
        assert "this worker has version 1" in msg and "live workers have version 1 of lab_report" in msg
        assert "lab_report.v2.yaml" in msg and "`medq requeue labs`" in msg
        assert job["attempts"] == 0  # the model was never asked

    # plain requeue with still no capable worker: nothing runs, and it says what is missing
    res = run_cli(["requeue", "labs"], producer_env)
    assert res.returncode == 0, res.stderr
    assert "requeued 0 job(s)" in res.stderr
    assert f"{JOBS} job(s) of schema lab_report version 2: no live worker" in res.stderr

    worker(base_url, env={**medq_env, "MEDQ_SCHEMAS_DIRS": new_dir})
    res = run_cli(["requeue", "labs"], producer_env)
    assert f"requeued {JOBS} job(s)" in res.stderr, res.stderr
    deadline = time.monotonic() + 60
    while json.loads(run_cli(["status", "labs", "--json"], producer_env).stdout).get("succeeded") != JOBS:
        assert time.monotonic() < deadline, run_cli(["status", "labs"], producer_env).stdout
        time.sleep(0.2)
    docs = _docs(producer_env, "labs")
    assert all(d["schema_version"] == 2 and d["error"] is None for d in docs)
    assert all(d["attempts"] == 1 for d in docs), [d["attempts"] for d in docs]


def test_real_workers_take_the_queues_of_their_schema_versions(
    broker: dict[str, str], r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str],
    worker_process: Callable[..., Proc], tmp_path: Path,
) -> None:
    """The issue's fleet as real ``medq worker`` processes (Celery's own worker adds the
    queue of each schema version it has): 6 jobs of v2, an old worker with v1 only."""
    old_dir = _folder(tmp_path / "old", lab_report=V1)
    new_dir = _folder(tmp_path / "new", lab_report=V2)
    base_url = simulator("--latency-ms", "100")
    env = {**medq_env, **broker, "MEDQ_JOBS_PER_MESSAGE": "1"}
    old = worker_process(base_url, "--loglevel", "INFO", env={**env, "MEDQ_SCHEMAS_DIRS": old_dir})
    worker_process(base_url, env={**env, "MEDQ_SCHEMAS_DIRS": new_dir})
    notes = tmp_path / "six.jsonl"
    notes.write_text("".join(json.dumps({"id": f"r{i}", "text": f"HbA1c 7.{i} %."}) + "\n" for i in range(6)),
                     encoding="utf-8")

    t0 = time.monotonic()
    res = run_cli(["enqueue", str(notes), "--schema", "lab_report", "--batch", "six", "--wait", "--timeout-s", "60"],
                  {**env, "MEDQ_SCHEMAS_DIRS": new_dir})
    took_s = time.monotonic() - t0
    assert res.returncode == 0, res.stderr + old.log
    docs = _docs(env, "six")
    assert all(d["status"] == "succeeded" and d["schema_version"] == 2 for d in docs)
    assert all(d["attempts"] == 1 and d["deliveries"] <= 2 for d in docs), [(d["attempts"], d["deliveries"]) for d in docs]
    print(f"6 jobs in {took_s:.1f}s; deliveries {sorted(d['deliveries'] for d in docs)}")


def test_jobs_handed_to_a_worker_that_then_died_fail_clearly_instead_of_waiting_forever(
    r: redis.Redis, redis_url: str, medq_env: dict[str, str], simulator: Callable[..., str],
    worker: Callable[..., InProcessWorker], tmp_path: Path,
) -> None:
    """The only capable worker said its schemas and was killed (no word after): the old
    worker hands the jobs to its queue, where nobody takes them. Once its word runs out (a
    lease) the orphan sweep sends them again, and the old worker fails them, saying why."""
    async def a_worker_that_dies_after_saying_its_schemas() -> None:
        client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
        await fleet.publish(client, "gone:1", [("lab_report", 2)], ttl_ms=2000)
        await client.aclose()

    old_dir = _folder(tmp_path / "old", lab_report=V1)
    new_dir = _folder(tmp_path / "new", lab_report=V2)
    env = {**medq_env, "MEDQ_WORKER__LEASE_S": "2"}
    worker(simulator(), env={**env, "MEDQ_SCHEMAS_DIRS": old_dir})
    asyncio.run(a_worker_that_dies_after_saying_its_schemas())

    res = run_cli(["enqueue", str(_notes(tmp_path)), "--schema", "lab_report", "--batch", "labs",
                   "--wait", "--timeout-s", "60"], {**env, "MEDQ_SCHEMAS_DIRS": new_dir})
    assert res.returncode == 1, res.stderr
    failed = [json.loads(line) for line in run_cli(["failed", "labs", "--json"], env).stdout.splitlines()]
    assert len(failed) == JOBS
    assert all(j["error_kind"] == "schema_unavailable" and j["attempts"] == 0 for j in failed)
    assert all(j["deliveries"] <= 3 for j in failed), [j["deliveries"] for j in failed]
