"""A corrected record, end to end: CLI -> Redis -> a real worker -> the simulator -> results.

The simulator copies the age written in the note into ``age``, so the result shows
which text ran.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import redis

from medq.core.contract import job_key, result_key
from tests.helpers import Proc, run_cli, wait_log

NOTE = "Patient {i} is a {age}-year-old woman with asthma. Salbutamol 100 mcg as needed."


def _file(path: Path, ages: dict[str, int]) -> str:
    rows = [{"id": rid, "text": NOTE.format(i=i, age=age)} for i, (rid, age) in enumerate(ages.items())]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def _results(env: dict[str, str], batch: str) -> list[dict]:
    res = run_cli(["results", batch], env)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


def test_a_corrected_note_runs_with_replace_and_its_result_replaces_the_old(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., Proc],
    tmp_path: Path,
) -> None:
    base_url = simulator("--latency-ms", "10")
    enqueue = ["enqueue", "--schema", "clinical_note", "--batch", "ward-3"]
    original = _file(tmp_path / "notes.jsonl", {"a": 40, "b": 50, "c": 60})
    fixed = _file(tmp_path / "fixed.jsonl", {"a": 41, "b": 50, "c": 60})

    # No worker yet: a's first job is still waiting in the queue when its correction comes.
    assert run_cli([*enqueue, original], medq_env).returncode == 0
    res = run_cli([*enqueue, fixed], medq_env)
    assert res.returncode == 2
    assert "record 'a' is already in batch ward-3 with different text; the new text was NOT enqueued" in res.stderr
    assert "--replace" in res.stderr
    res = run_cli([*enqueue, fixed, "--replace"], medq_env)
    assert res.returncode == 0, res.stderr

    wk = worker(base_url)
    res = run_cli([*enqueue, fixed, "--replace", "--wait", "--timeout-s", "120"], medq_env)
    assert res.returncode == 0, res.stderr
    assert "0 new, 3 already enqueued)" in res.stderr  # the same correction again: nothing new
    docs = _results(medq_env, "ward-3")
    assert [(d["id"], d["status"], d["data"]["age"]) for d in docs] == [
        ("a", "succeeded", 41), ("b", "succeeded", 50), ("c", "succeeded", 60)]
    status = run_cli(["status", "ward-3", "--json"], medq_env)
    assert json.loads(status.stdout)["total"] == 3  # one job per record
    # the superseded first job's message was delivered and did nothing
    old_a = next(k.decode().split(":")[-1] for k in r.keys(job_key("*")) if r.hget(k, "superseded_by"))
    wait_log(wk, f"job {old_a}: replaced by job {docs[0]['job_id']}")
    assert not r.exists(result_key(old_a))
    assert r.ttl(job_key(old_a)) > 0  # the record's first job, pointing at its revision, expires with it

    # a second correction, after the first one ran: runs again; the others are untouched
    again = _file(tmp_path / "again.jsonl", {"a": 42, "b": 50, "c": 60})
    res = run_cli([*enqueue, again, "--replace", "--wait", "--timeout-s", "120"], medq_env)
    assert res.returncode == 0, res.stderr
    assert "1 replaced by a new revision" in res.stderr
    after = _results(medq_env, "ward-3")
    assert [(d["id"], d["data"]["age"]) for d in after] == [("a", 42), ("b", 50), ("c", 60)]
    assert after[0]["job_id"] != docs[0]["job_id"]
    assert after[1:] == docs[1:]  # same jobs, same results, same finish times
    assert r.ttl(job_key(old_a)) > 0 and r.ttl(job_key(docs[0]["job_id"])) > 0

    # the original file again: a conflict with what the batch now holds, reported, not re-run
    res = run_cli([*enqueue, original], medq_env)
    assert res.returncode == 2 and "record 'a' is already in batch ward-3" in res.stderr
    assert [(d["id"], d["data"]["age"]) for d in _results(medq_env, "ward-3")] == [("a", 42), ("b", 50), ("c", 60)]
