"""Durable results in the real PostgreSQL on 127.0.0.1:5432."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import redis
import sqlalchemy as sa

from medq.state.results.postgres_store import PostgresResultStore
from tests.helpers import check_first_success_kept, run_cli


def _doc(job_id: str, status: str = "succeeded", **kw: object) -> dict:
    return {"id": f"rec-{job_id}", "job_id": job_id, "batch": "b", "status": status, "data": {"age": 1}, **kw}


def test_upsert_keeps_one_row_per_job(store: PostgresResultStore) -> None:
    store.put(_doc("j1", status="failed", data=None, error={"kind": "timeout", "message": "m"}))
    store.put(_doc("j1"))
    store.put(_doc("j2"))
    assert store.get("j1") == _doc("j1")
    assert store.get("missing") is None
    assert sorted(d["job_id"] for d in store.get_many(["j1", "j2", "j3"])) == ["j1", "j2"]
    with store._engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM medq_results")).scalar() == 2


def test_worker_writes_results_to_postgres(
    r: redis.Redis, store: PostgresResultStore, pg_url: str, medq_env: dict[str, str],
    simulator: Callable[..., str], worker: Callable[..., object], tmp_path: Path,
) -> None:
    env = {**medq_env, "MEDQ_RESULTS_URL": pg_url}
    worker(simulator(), env={"MEDQ_RESULTS_URL": pg_url})
    notes = tmp_path / "n.jsonl"
    notes.write_text("".join(json.dumps({"id": f"p{i}", "text": f"{40 + i}-year-old man, cough."}) + "\n" for i in range(10)))
    res = run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "pg", "--wait", "--timeout-s", "60"], env)
    assert res.returncode == 0, res.stderr

    with store._engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT record_id, status, doc FROM medq_results WHERE batch = 'pg' ORDER BY record_id")).all()
    assert [row.record_id for row in rows] == [f"p{i}" for i in range(10)]
    assert all(row.status == "succeeded" and row.doc["data"]["age"] == 40 + int(row.record_id[1:]) for row in rows)
    assert not r.keys("medq:result:*")  # nothing in the Redis result store

    exported = [json.loads(line) for line in run_cli(["results", "pg"], env).stdout.splitlines()]
    assert [d["id"] for d in exported] == [f"p{i}" for i in range(10)]
    assert all(d["data"] is not None for d in exported)


def test_postgres_result_store_keeps_the_first_success(pg_url: str) -> None:
    check_first_success_kept(pg_url)
