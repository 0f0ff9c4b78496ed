"""The canary scan again, with faults in the mix (issue 14): one of the two endpoints
echoes every request back in its error body, and the PostgreSQL results store goes
away mid-batch and comes back. Encryption is on. Record text must still reach only the
endpoints and, sealed, the payload and result stores: no Redis key, no PostgreSQL row,
no log line and no command output may show it in clear."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import redis
import sqlalchemy as sa

from medq.state.jobs import iter_states
from tests.helpers import (
    CHINESE,
    ESCAPED,
    NEEDLES,
    SHORT_LINES,
    Proc,
    TcpProxy,
    echo,
    hits,
    redis_hits,
    report_scan,
    run_cli,
    wait_log,
    wait_until,
)

BATCH = "canary-faults"


def _notes(path: Path) -> Path:
    notes = {"short": SHORT_LINES, "zh": CHINESE, "esc": ESCAPED}
    notes.update({f"r{i:02d}": f"ZZCANARY{i:02d} {40 + i}-year-old man, cough and fever for {i} days." for i in range(21)})
    path.write_text("".join(json.dumps({"id": k, "text": v}, ensure_ascii=False) + "\n" for k, v in notes.items()),
                    encoding="utf-8")
    return path


def test_no_canary_with_an_echoing_endpoint_and_a_failing_store(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker_process: Callable[..., Proc],
    servers: Callable[..., object], proxied_pg: tuple[TcpProxy, str], tmp_path: Path,  # noqa: F811
) -> None:
    proxy, pg_url = proxied_pg
    key = run_cli(["keygen"], medq_env).stdout.strip()
    echoer = servers(echo)
    sim = simulator("--latency-ms", "800")
    env = {**medq_env, "MEDQ_ENCRYPTION_KEY": key, "MEDQ_RESULTS_URL": pg_url, "MEDQ_WORKER__LEASE_S": "3",
           "MEDQ_LLM__ENDPOINTS": f"{sim},{echoer.base}"}  # type: ignore[attr-defined]
    proc = worker_process(sim, env=env)  # a real process: its whole log (Celery's lines too) is scanned
    needles = NEEDLES  # the canary of the English notes (ZZCANARY) among them

    notes = _notes(tmp_path / "notes.jsonl")
    res = run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", BATCH], env)
    assert res.returncode == 0, res.stderr
    # The echoing endpoint fails its jobs at once, while the simulator's are still at the
    # model (800 ms): cut then. (Waiting for simulator answers instead let a round of them
    # all be stored before the cut, and no write met the outage.)
    wait_until(lambda: Counter(st.status for st in iter_states(r, BATCH))["failed"] >= 1, timeout_s=90)
    proxy.cut()  # the store goes away while answers keep arriving
    wait_log(proc, "result store unavailable")  # a write met the outage
    proxy.restore()
    # the same command again enqueues nothing new; --wait waits for the batch and prints its progress
    res = run_cli(["enqueue", str(notes), "--schema", "clinical_note", "--batch", BATCH, "--wait",
                   "--timeout-s", "240"], env)
    out, err = res.stdout, res.stderr

    states = Counter(st.status for st in iter_states(r, BATCH))
    assert sum(states.values()) == 24 and set(states) <= {"succeeded", "failed"}, states
    assert states["succeeded"] and states["failed"], states  # both faults were in the mix
    assert any(method == "POST" for method, *_ in echoer.requests)  # type: ignore[attr-defined]
    assert "result store unavailable" in proc.log

    failed = run_cli(["failed", BATCH, "--json"], env)
    status = run_cli(["status", BATCH, "--json"], env)
    places = {"worker log": proc.log, "medq failed": failed.stdout + failed.stderr,
              "medq status": status.stdout + status.stderr, "enqueue --wait": out + err}
    engine = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        rows = [json.dumps(row._asdict(), default=str, ensure_ascii=False)
                for row in conn.execute(sa.text("SELECT * FROM medq_results WHERE batch = :b"), {"b": BATCH})]
    engine.dispose()
    assert len(rows) == 24
    found = {k: hits(v, needles) for k, v in places.items() if hits(v, needles)}
    found.update({f"postgres row {i}": hits(row, needles) for i, row in enumerate(rows) if hits(row, needles)})
    redis_found = redis_hits(r, needles)
    report_scan("faults", {**{k: 1 for k in places}, "postgres rows": len(rows),
                           "redis keys": sum(1 for _ in r.scan_iter(count=1000))}, len(found) + len(redis_found))
    assert found == {} and redis_found == {}
