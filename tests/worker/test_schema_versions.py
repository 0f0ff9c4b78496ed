"""A rolling schema upgrade: each job runs under the version it was enqueued with, and
its result says that version. A worker without that version hands the job on to one that
has it, or, with none alive, makes it a dead letter that `medq requeue` runs later."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import redis

from tests.helpers import run_cli

V1 = """name: lab_report
version: 1
fields:
  hba1c_pct: {type: [number, "null"], description: HbA1c in percent.}
  egfr: {type: [integer, "null"], description: eGFR.}
"""
V2 = """name: lab_report
version: 2
fields:
  hba1c_pct: {type: [number, "null"], description: HbA1c in percent.}
  egfr: {type: [integer, "null"], description: eGFR.}
  potassium_mmol_l: {type: [number, "null"], description: Potassium in mmol/L.}
"""


def _folder(path: Path, **files: str) -> str:
    path.mkdir()
    for name, body in files.items():
        (path / f"{name}.yaml").write_text(body, encoding="utf-8")
    return str(path)


def _docs(env: dict[str, str], batch: str) -> list[dict]:
    res = run_cli(["results", batch], env)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


def _until(what: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


def test_each_job_runs_under_its_own_schema_version(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object],
    tmp_path: Path,
) -> None:
    v1_only = _folder(tmp_path / "v1", lab_report=V1)
    v2_only = _folder(tmp_path / "v2", lab_report=V2)
    both = _folder(tmp_path / "both", lab_report=V2, **{"lab_report.v1": V1})
    notes = tmp_path / "labs.jsonl"
    notes.write_text("".join(json.dumps({"id": f"r{i}", "text": f"HbA1c 7.{i} %, eGFR 6{i}."}) + "\n"
                             for i in range(3)), encoding="utf-8")
    base_url = simulator()

    old = run_cli(["enqueue", str(notes), "--schema", "lab_report", "--batch", "labs-v1"],
                  {**medq_env, "MEDQ_SCHEMAS_DIRS": v1_only})
    assert old.returncode == 0, old.stderr

    # An upgraded worker has only v2: it must not answer v1's jobs with v2's fields. With no
    # worker alive that has v1, they fail at once, saying so (tests/worker/test_fleet_rollout.py).
    upgraded = worker(base_url, env={"MEDQ_SCHEMAS_DIRS": v2_only})
    _until(lambda: all(d["error"] and d["error"]["kind"] == "schema_unavailable"
                       for d in _docs(medq_env, "labs-v1")))
    docs = _docs(medq_env, "labs-v1")
    assert all(d["status"] == "failed" and d["data"] is None for d in docs)
    assert "schema lab_report version 1 is not loaded in any live worker" in docs[0]["error"]["message"]
    upgraded.stop()  # type: ignore[attr-defined]

    # A worker with both files takes them again, under v1; new jobs get v2.
    worker(base_url, env={"MEDQ_SCHEMAS_DIRS": both})
    again = run_cli(["requeue", "labs-v1"], {**medq_env, "MEDQ_SCHEMAS_DIRS": both})
    assert "requeued 3 job(s)" in again.stderr, again.stderr
    new = run_cli(["enqueue", str(notes), "--schema", "lab_report", "--batch", "labs-v2", "--wait", "--timeout-s", "60"],
                  {**medq_env, "MEDQ_SCHEMAS_DIRS": both})
    assert new.returncode == 0, new.stderr
    _until(lambda: all(d["status"] == "succeeded" for d in _docs(medq_env, "labs-v1")))

    for d in _docs(medq_env, "labs-v1"):
        assert d["schema_version"] == 1 and set(d["data"]) == {"hba1c_pct", "egfr"}
    for d in _docs(medq_env, "labs-v2"):
        assert d["schema_version"] == 2 and set(d["data"]) == {"hba1c_pct", "egfr", "potassium_mmol_l"}

    listed = run_cli(["schemas", "list"], {**medq_env, "MEDQ_SCHEMAS_DIRS": both})
    assert listed.stdout.count("lab_report") == 2
