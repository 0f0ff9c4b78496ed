"""Encryption at rest: with MEDQ_ENCRYPTION_KEY set, no value stored in Redis or
PostgreSQL holds record text or extracted values in clear; keys rotate. Real Redis,
PostgreSQL, worker and simulator; every key and row is scanned for the canaries."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from cryptography.fernet import Fernet

from medq.state.results.postgres_store import PostgresResultStore
from tests.helpers import report_scan, run_cli, values

CANARY = "ZZSEALED"
K1, K2 = Fernet.generate_key().decode(), Fernet.generate_key().decode()


def _notes(path: Path, n: int) -> Path:
    path.write_text("".join(
        json.dumps({"id": f"e{i}", "text": f"{CANARY}{i} Mr {CANARY}NAME{i} is {50 + i} years old, {CANARY}DX{i}."}) + "\n"
        for i in range(n)
    ), encoding="utf-8")
    return path


def _redis_hits(r: redis.Redis) -> tuple[int, list[str]]:
    """Every key in the test database, payloads and results included."""
    keys = list(r.scan_iter(count=1000))
    return len(keys), [k.decode() for k in keys if any(CANARY.encode() in v for v in values(r, k))]


def test_payloads_and_redis_results_are_sealed_and_read_back(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object], tmp_path: Path
) -> None:
    env = {**medq_env, "MEDQ_ENCRYPTION_KEY": K1}
    notes = _notes(tmp_path / "n.jsonl", 12)
    assert run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "sealed"], env).returncode == 0
    scanned, hits = _redis_hits(r)
    assert r.keys("medq:payload:*") and hits == []  # the queued records: sealed

    # rotation: the worker has a new key first and the old one after it
    worker(simulator(), env={"MEDQ_ENCRYPTION_KEY": f"{K2},{K1}"})
    assert run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "sealed", "--wait", "--timeout-s", "60"],
                   env).returncode == 0
    scanned, hits = _redis_hits(r)
    assert len(r.keys("medq:result:*")) == 12 and hits == [], hits

    report_scan("encryption-redis", {"Redis keys, payloads and results included": scanned}, hits=len(hits))
    rotated = {**medq_env, "MEDQ_ENCRYPTION_KEY": f"{K2},{K1}"}
    docs = [json.loads(x) for x in run_cli(["results", "sealed"], rotated).stdout.splitlines()]
    assert len(docs) == 12 and all(CANARY in json.dumps(d["data"]) for d in docs)  # read back, in clear
    # results were sealed with the new key: the old one alone, or none, cannot read them
    for key_env in (env, medq_env):
        res = run_cli(["results", "sealed"], key_env)
        assert res.returncode == 2 and "MEDQ_ENCRYPTION_KEY" in res.stderr and CANARY not in res.stdout + res.stderr


def test_postgres_rows_are_sealed(
    r: redis.Redis, store: PostgresResultStore, pg_url: str, medq_env: dict[str, str],  # noqa: F811
    simulator: Callable[..., str], worker: Callable[..., object], tmp_path: Path,
) -> None:
    env = {**medq_env, "MEDQ_ENCRYPTION_KEY": K1, "MEDQ_RESULTS_URL": pg_url}
    worker(simulator(), env={"MEDQ_ENCRYPTION_KEY": K1, "MEDQ_RESULTS_URL": pg_url})
    assert run_cli(["enqueue", str(_notes(tmp_path / "n.jsonl", 10)), "--schema", "clinical_note", "--batch", "pgs",
                    "--wait", "--timeout-s", "60"], env).returncode == 0
    with store._engine.connect() as conn:
        rows = [" ".join(map(str, row)) for row in conn.execute(sa.text("SELECT * FROM medq_results")).all()]
    assert len(rows) == 10 and [row for row in rows if CANARY in row] == []
    report_scan("encryption-postgres", {"PostgreSQL rows of medq_results (every column)": len(rows)}, hits=0)
    assert _redis_hits(r)[1] == []
    docs = [json.loads(x) for x in run_cli(["results", "pgs"], env).stdout.splitlines()]
    assert len(docs) == 10 and all(d["data"]["age"] == 50 + int(d["id"][1:]) for d in docs)


@pytest.mark.e2e  # the worker process refuses at start (worker_init)
def test_a_malformed_key_stops_the_worker_at_start(medq_env: dict[str, str]) -> None:
    res = run_cli(["worker", "-c", "1"], {**medq_env, "MEDQ_ENCRYPTION_KEY": "not-a-key"}, process=True)
    assert res.returncode != 0 and "MEDQ_ENCRYPTION_KEY must be Fernet keys" in res.stdout + res.stderr
