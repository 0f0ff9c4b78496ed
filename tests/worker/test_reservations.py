"""A job a live worker holds is not lost: the orphan sweep leaves it (``worker.leases``).

A retry's countdown message waits in its worker, unacknowledged, and when it is due it
may wait longer still for a free pool thread. Before, the sweep took such a job for lost
once its due time was a grace past, and sent it again, over and over (184 deliveries for
24 jobs on a one-slot server, issue 24). The worker now keeps the jobs of every message
it holds heard of (``task_received``), until it has run them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from medq.state.jobs import iter_states
from tests.helpers import Proc, records, run_cli


def test_a_due_retry_waiting_for_the_busy_pool_thread_is_not_sent_again(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker_process: Callable[..., Proc],
    tmp_path: Path,
) -> None:
    base = simulator("--latency-ms", "7000")  # the job that runs holds the one pool thread for 7 s
    httpx.post(base.removesuffix("/v1") + "/sim/script", json={"outcomes": ["503"]}).raise_for_status()
    # one pool thread, leases of 3 s: the sweep would count a job lost 2 s past its due time
    proc = worker_process(base, "-c", "1", env={"MEDQ_WORKER__LEASE_S": "3"})
    env = {**medq_env, "MEDQ_JOBS_PER_MESSAGE": "1"}  # the first job's 503 frees the thread for the second
    res = run_cli(["enqueue", str(records(tmp_path / "two.jsonl", 2)), "--schema", "clinical_note",
                   "--batch", "held", "--wait", "--timeout-s", "60"], env)
    assert res.returncode == 0, res.stderr
    # the first job got the 503 and went back with a countdown (at most 2 s): its message
    # waited in the worker, due, while the second job held the thread for 7 s
    states = sorted((st.attempts, st.deliveries) for st in iter_states(r, "held"))
    assert states == [(1, 1), (2, 2)], states  # two deliveries for the one put back, not more
    assert "sent again" not in proc.log
    docs = [json.loads(x) for x in run_cli(["results", "held"], medq_env).stdout.splitlines()]
    assert sorted(d["deliveries"] for d in docs) == [1, 2]
    assert httpx.get(base.removesuffix("/v1") + "/stats").json()["requests"] == 3
