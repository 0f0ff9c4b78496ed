"""A results store that goes away is back-pressure, not a dead worker.

PostgreSQL is reached through a TCP proxy of the test's own (the shared cluster on
127.0.0.1:5432 is never stopped): cutting the proxy closes its listener and every
connection through it, as a stopped server would; restoring it listens again.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import redis

from medq.state.jobs import iter_states
from tests.helpers import TcpProxy, run_cli, stats, wait_until


def _records(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"r{i:03d}", "text": f"{30 + i}-year-old woman, cough."}) + "\n" for i in range(n)))
    return path


def test_a_store_outage_holds_the_answers_and_asks_the_model_once(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object],
    proxied_pg: tuple[TcpProxy, str], tmp_path: Path,
) -> None:
    proxy, url = proxied_pg
    env = {**medq_env, "MEDQ_RESULTS_URL": url, "MEDQ_WORKER__LEASE_S": "3"}
    base = simulator("--latency-ms", "1500")
    w = worker(base, env={**env, "MEDQ_LLM__MAX_IN_FLIGHT": "8"})
    n = 40
    recs = _records(tmp_path / "recs.jsonl", n)
    res = run_cli(["enqueue", str(recs), "--schema", "clinical_note", "--batch", "outage"], env)
    assert res.returncode == 0, res.stderr
    wait_until(lambda: Counter(st.status for st in iter_states(r, "outage"))["succeeded"] >= 4)
    proxy.cut()  # mid-batch: the rest of the answers arrive while the store is away
    # every answer has come (held by its job, which keeps its lease: 3 s, renewed) before the store is back
    wait_until(lambda: stats(base)["requests"] == n and stats(base)["in_flight"] == 0, timeout_s=120)
    proxy.restore()
    # the same command again enqueues nothing new; --wait waits for the batch to finish
    res = run_cli(["enqueue", str(recs), "--schema", "clinical_note", "--batch", "outage", "--wait", "--timeout-s", "240"],
                  env)
    assert res.returncode == 0, res.stderr

    states = list(iter_states(r, "outage"))
    assert len(states) == n and {st.status for st in states} == {"succeeded"}
    assert not [st for st in states if st.error_kind == "worker_lost"]
    assert stats(base)["requests"] == n  # every answer kept: no job asked twice
    docs = [json.loads(x) for x in run_cli(["results", "outage"], env).stdout.splitlines()]
    assert len(docs) == n and all(d["data"] is not None and d["attempts"] == 1 for d in docs)
    log = w.log  # type: ignore[attr-defined]
    assert "result store unavailable" in log
    assert "INSERT" not in log and "parameters" not in log  # the driver's text (SQL, values) is never logged


def test_a_store_away_past_the_bound_fails_a_job_that_plain_requeue_takes(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object],
    proxied_pg: tuple[TcpProxy, str], tmp_path: Path,
) -> None:
    proxy, url = proxied_pg
    env = {**medq_env, "MEDQ_RESULTS_URL": url}
    base = simulator()
    worker(base, env={**env, "MEDQ_WORKER__STORE_WAIT_S": "3"})
    proxy.cut()
    recs = _records(tmp_path / "recs.jsonl", 2)
    res = run_cli(["enqueue", str(recs), "--schema", "clinical_note", "--batch", "away", "--wait", "--timeout-s", "90"], env)
    assert res.returncode == 1, res.stderr
    dead = [json.loads(x) for x in run_cli(["failed", "away", "--json"], env).stdout.splitlines()]
    assert sorted(d["error_kind"] for d in dead) == ["store_unavailable"] * 2
    assert "MEDQ_WORKER__STORE_WAIT_S" in dead[0]["error_message"]

    proxy.restore()
    assert "requeued 2 job(s)" in run_cli(["requeue", "away"], env).stderr  # plain requeue: a transient kind
    res = run_cli(["enqueue", str(recs), "--schema", "clinical_note", "--batch", "away", "--wait", "--timeout-s", "90"], env)
    assert res.returncode == 0, res.stderr
    docs = [json.loads(x) for x in run_cli(["results", "away"], env).stdout.splitlines()]
    assert [d["status"] for d in docs] == ["succeeded"] * 2
