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
    bases = [simulator("--latency-ms", "400"), simulator("--latency-ms", "400")]
    # Two endpoints, one request in flight at a time on each across two worker processes, and
    # no waiting for a slot another holds (with several endpoints a call does not wait in
    # line: another may be free): jobs are put back for capacity, some often.
    tight = {"MEDQ_LLM__ENDPOINTS": json.dumps(bases), "MEDQ_LLM__MAX_IN_FLIGHT": "1", "MEDQ_LLM__MAX_WAIT_S": "0.05"}
    worker(bases[0], env=tight)
    worker(bases[0], env=tight)
    n = 12
    # four jobs a message, side by side in one process against two slots: some must wait, and
    # three messages: both workers get some
    env = {**medq_env, "MEDQ_JOBS_PER_MESSAGE": "4"}
    assert enqueue_wait(env, records(tmp_path / "recs.jsonl", n), "tight", timeout_s=180) == 0
    assert sum(stats(base)["requests"] for base in bases) == n  # each job asked the model once

    docs = [json.loads(x) for x in run_cli(["results", "tight"], medq_env).stdout.splitlines()]
    assert len(docs) == n and {d["status"] for d in docs} == {"succeeded"}
    assert [d["attempts"] for d in docs] == [1] * n  # runs that reached the model
    assert all(d["deliveries"] >= 1 for d in docs)
    assert sum(d["deliveries"] for d in docs) > n  # the deferrals are counted, as deliveries
    states = {st.record_id: st for st in iter_states(r, "tight")}
    assert all((states[d["id"]].attempts, states[d["id"]].deliveries) == (1, d["deliveries"]) for d in docs)
