"""End to end: CLI -> Redis -> real Celery worker process -> simulator over HTTP -> results."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from medq.core.schemas import SchemaLoader
from tests.helpers import run_cli

NOTE = ("{cid} Patient {i} is a {age}-year-old female with asthma and type 2 diabetes. Salbutamol 100 mcg as needed. "
        "Allergic to penicillin. Former smoker.")


def _records(path: Path, n: int, canary: str = "") -> Path:
    rows = [{"id": f"r{i:03d}", "text": NOTE.format(cid=f"{canary}{i:03d}" if canary else "", i=i, age=20 + i % 70)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _results(env: dict[str, str], batch: str) -> list[dict]:
    res = run_cli(["results", batch], env)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


def _script(base_url: str, *outcomes: str) -> None:
    httpx.post(base_url.removesuffix("/v1") + "/sim/script", json={"outcomes": list(outcomes)}).raise_for_status()


def test_fifty_records_through_the_cli(r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str],
                                       worker: Callable[..., object], tmp_path: Path) -> None:
    base_url = simulator("--latency-ms", "20")
    worker(base_url)
    res = run_cli(["enqueue", str(_records(tmp_path / "notes.jsonl", 50)), "--schema", "clinical_note",
                   "--wait", "--timeout-s", "120"], medq_env)
    assert res.returncode == 0, res.stderr
    batch = res.stdout.strip()
    assert "50/50" in res.stderr

    docs = _results(medq_env, batch)
    assert len(docs) == 50
    assert len({d["job_id"] for d in docs}) == 50
    assert [d["id"] for d in docs] == [f"r{i:03d}" for i in range(50)]  # input order
    model = SchemaLoader().get("clinical_note").model
    for d in docs:
        assert d["status"] == "succeeded" and d["error"] is None
        assert d["schema"] == "clinical_note" and d["schema_version"] == 1
        assert d["endpoint"] == base_url and d["attempts"] == 1 and d["usage"]["total_tokens"] > 0
        model.model_validate(d["data"])
    assert docs[5]["data"]["age"] == 25

    status = run_cli(["status", batch, "--json"], medq_env)
    assert json.loads(status.stdout)["succeeded"] == 50

    csv_out = tmp_path / "out.csv"
    assert run_cli(["results", batch, "--format", "csv", "-o", str(csv_out)], medq_env).returncode == 0
    assert len(csv_out.read_text().splitlines()) == 51

    # the same file again: same batch, nothing runs twice
    again = run_cli(["enqueue", str(tmp_path / "notes.jsonl"), "--schema", "clinical_note", "--wait"], medq_env)
    assert again.stdout.strip() == batch and "0 new, 50 already enqueued" in again.stderr
    assert len(_results(medq_env, batch)) == 50


def test_faults_end_in_succeeded_or_failed_with_a_kind(r: redis.Redis, medq_env: dict[str, str],
                                                      simulator: Callable[..., str], worker: Callable[..., object],
                                                      tmp_path: Path) -> None:
    base_url = simulator("--fault", "429:0.1,500:0.05,malformed:0.05,truncated:0.05", "--seed", "7")
    worker(base_url, env={"MEDQ_LLM__MAX_TOKENS": "512"})
    res = run_cli(["enqueue", str(_records(tmp_path / "notes.jsonl", 80)), "--schema", "clinical_note",
                   "--wait", "--timeout-s", "180"], medq_env)
    assert res.returncode in (0, 1), res.stderr
    docs = _results(medq_env, res.stdout.strip())
    assert len(docs) == 80 and len({d["job_id"] for d in docs}) == 80
    for d in docs:
        assert d["status"] in ("succeeded", "failed")
        assert (d["status"] == "failed") == (d["error"] is not None and bool(d["error"]["kind"]))
    stats = httpx.get(base_url.removesuffix("/v1") + "/stats").json()
    assert stats["outcomes"].get("429", 0) > 0 and stats["outcomes"].get("500", 0) > 0
    assert Counter(d["status"] for d in docs)["succeeded"] >= 70


def test_transient_errors_are_retried_and_permanent_ones_are_dead_letters(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object], tmp_path: Path
) -> None:
    base_url = simulator()
    worker(base_url, env={"MEDQ_LLM__REASKS": "1"})
    notes = _records(tmp_path / "one.jsonl", 1)

    _script(base_url, "500", "429")
    res = run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "t", "--wait", "--timeout-s", "60"], medq_env)
    assert res.returncode == 0, res.stderr
    [doc] = _results(medq_env, "t")
    assert doc["status"] == "succeeded" and doc["attempts"] == 3

    _script(base_url, "invalid", "invalid")
    res = run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "p", "--wait", "--timeout-s", "60"], medq_env)
    assert res.returncode == 1 and "1 job(s) failed" in res.stderr
    [doc] = _results(medq_env, "p")
    assert doc["status"] == "failed" and doc["data"] is None
    assert doc["error"]["kind"] == "output_invalid" and "record r000" in doc["error"]["message"]
    assert doc["attempts"] == 1  # permanent: not retried

    dead = run_cli(["failed", "p", "--json"], medq_env)
    [row] = [json.loads(line) for line in dead.stdout.splitlines()]
    assert row["record_id"] == "r000" and row["error_kind"] == "output_invalid"

    # plain requeue takes only transient failures; --all-failed takes this one too
    assert "requeued 0 job(s)" in run_cli(["requeue", "p"], medq_env).stderr
    assert "requeued 1 job(s)" in run_cli(["requeue", "p", "--all-failed"], medq_env).stderr
    res = run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "p", "--wait", "--timeout-s", "60"], medq_env)
    assert res.returncode == 0, res.stderr
    [doc] = _results(medq_env, "p")
    assert doc["status"] == "succeeded" and doc["attempts"] == 2 and doc["error"] is None


def test_expired_record_fails_with_a_reason_and_is_not_lost(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object], tmp_path: Path
) -> None:
    notes = _records(tmp_path / "two.jsonl", 2)
    res = run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "gone"], medq_env)
    assert res.returncode == 0, res.stderr
    [payload] = [k for k in r.keys("medq:payload:*")][:1]
    r.delete(payload)  # as if MEDQ_PAYLOAD_TTL_S ran out before a worker got to it
    worker(simulator())
    res = run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "gone", "--wait", "--timeout-s", "60"], medq_env)
    assert res.returncode == 1
    docs = {d["id"]: d for d in _results(medq_env, "gone")}
    failed = [d for d in docs.values() if d["status"] == "failed"]
    assert len(docs) == 2 and len(failed) == 1
    assert failed[0]["error"]["kind"] == "payload_missing"
    assert f"record {failed[0]['id']}" in failed[0]["error"]["message"] and "new --batch" in failed[0]["error"]["message"]
    assert "cannot run again" in run_cli(["requeue", "gone", "--all-failed"], medq_env).stderr
