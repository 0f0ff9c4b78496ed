"""``attempts`` counts the runs that reached the model; ``deliveries`` every run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import redis

from medq.state.jobs import iter_states
from tests.helpers import enqueue_wait, records, run_cli, stats


def test_no_capacity_deferrals_are_deliveries_not_attempts(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object], tmp_path: Path
) -> None:
    base = simulator("--latency-ms", "400")
    # One request in flight at a time across two worker processes, and no waiting for the
    # slot the other holds: jobs are put back for capacity, some often.
    tight = {"MEDQ_LLM__MAX_IN_FLIGHT": "1", "MEDQ_LLM__MAX_WAIT_S": "0.05"}
    worker(base, env=tight)
    worker(base, env=tight)
    n = 12
    env = {**medq_env, "MEDQ_JOBS_PER_MESSAGE": "1"}  # one job a message: both workers get some
    assert enqueue_wait(env, records(tmp_path / "recs.jsonl", n), "tight", timeout_s=180) == 0
    assert stats(base)["requests"] == n  # each job asked the model once

    docs = [json.loads(x) for x in run_cli(["results", "tight"], medq_env).stdout.splitlines()]
    assert len(docs) == n and {d["status"] for d in docs} == {"succeeded"}
    assert [d["attempts"] for d in docs] == [1] * n  # runs that reached the model
    assert all(d["deliveries"] >= 1 for d in docs)
    assert sum(d["deliveries"] for d in docs) > n  # the deferrals are counted, as deliveries
    states = {st.record_id: st for st in iter_states(r, "tight")}
    assert all((states[d["id"]].attempts, states[d["id"]].deliveries) == (1, d["deliveries"]) for d in docs)
