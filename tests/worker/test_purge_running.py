"""A batch purged while its jobs run stays purged (issue 14, item 6): the runs in flight
and the messages still queued write back no job state, no result and no dead letter."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import redis
import sqlalchemy as sa

from medq.state.results.postgres_store import PostgresResultStore
from tests.helpers import run_cli, wait_settled

N = 60


def _notes(tmp_path: Path, n: int = N) -> Path:
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "text": f"{30 + i}-year-old woman, cough."}) + "\n" for i in range(n)))
    return path


def _purge_mid_batch(r: redis.Redis, env: dict[str, str], notes: Path, batch: str, results_done: Callable[[], int]) -> None:
    """Enqueue, wait until some jobs have finished and others run, purge with --results."""
    res = run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", batch], env)
    assert res.returncode == 0, res.stderr
    deadline = time.monotonic() + 120
    while results_done() < 3:
        assert time.monotonic() < deadline, "no job finished"
        time.sleep(0.2)
    assert r.hlen(f"medq:job:{_any_running(r)}") > 0, "nothing was running when the batch was purged"
    res = run_cli(["purge", batch, "--results", "--yes"], env)
    assert res.returncode == 0, res.stderr
    # Runs in flight end within a simulated request (1.5 s); the queued messages are
    # dropped as they arrive: wait until the worker has settled every message.
    wait_settled(r)


def _any_running(r: redis.Redis) -> str:
    for key in r.scan_iter("medq:job:*"):
        if r.hget(key, "status") == b"running":
            return key.decode().split(":", 2)[2]
    raise AssertionError("no job running")


def _left_behind(r: redis.Redis, batch: str) -> list[str]:
    """Every key the batch still has in Redis (the watch set and Celery's own keys hold ids only)."""
    keys = [k.decode() for k in r.scan_iter("medq:*")]
    return sorted(
        k for k in keys
        if k.startswith(("medq:job:", "medq:payload:", "medq:result:"))
        or k in (f"medq:batch:{batch}", f"medq:failed:{batch}", f"medq:owner:{batch}")
    )


def test_a_batch_purged_while_it_runs_stays_purged(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object], tmp_path: Path,
) -> None:
    worker(simulator("--latency-ms", "1500"))
    notes = _notes(tmp_path)
    _purge_mid_batch(r, medq_env, notes, "erase", lambda: len(list(r.scan_iter("medq:result:*"))))

    assert _left_behind(r, "erase") == []
    status = run_cli(["status", "erase"], medq_env)
    assert status.returncode != 0 and "no jobs in batch" in status.stderr
    assert run_cli(["results", "erase"], medq_env).stdout == ""

    # The same records can be enqueued again, and run to the end.
    res = run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", "erase", "--wait", "--timeout-s", "120"],
                  medq_env, timeout_s=180)
    assert res.returncode == 0, res.stderr
    assert len(run_cli(["results", "erase"], medq_env).stdout.splitlines()) == N


def test_purge_results_deletes_postgresql_rows_even_of_runs_in_flight(
    r: redis.Redis, pg_url: str, medq_env: dict[str, str],  # noqa: F811
    simulator: Callable[..., str], worker: Callable[..., object], tmp_path: Path,
) -> None:
    batch = f"erase-pg-{uuid.uuid4().hex[:8]}"  # the test database is shared: touch only this batch's rows
    env = {**medq_env, "MEDQ_RESULTS_URL": pg_url}
    PostgresResultStore(pg_url).close()  # the table, before the first count
    engine = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))

    def rows() -> int:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM medq_results WHERE batch = :b"), {"b": batch}).scalar() or 0)

    try:
        worker(simulator("--latency-ms", "1500"), env={"MEDQ_RESULTS_URL": pg_url})
        _purge_mid_batch(r, env, _notes(tmp_path, 40), batch, rows)
        assert rows() == 0
        assert _left_behind(r, batch) == []
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM medq_results WHERE batch = :b"), {"b": batch})
        engine.dispose()
