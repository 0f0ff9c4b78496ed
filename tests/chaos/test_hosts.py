"""Several hosts, tested as several hosts: three worker hosts in network namespaces of
their own (tests/hosts.py), one of them cut off mid-batch and later let back.

A partition, not a kill: the cut-off host's worker keeps running and believes it still
holds its jobs. The others must take those jobs over, and when the host comes back,
whatever its stale runs still had to say must change nothing.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from medq.core.contract import JobField, JobStatus, job_key
from medq.state.jobs import job_ids
from tests.chaos.helpers import enqueue, outcome, record, wait_done, write_records
from tests.helpers import MEDQ, Proc, run_cli, wait_log
from tests.hosts import Hosts, netns_problem

N = 500
BATCH = "hosts-cut"
CUT = 2  # the host cut off
FIELDS = (JobField.STATUS, JobField.RUN_ID, JobField.LEASE_UNTIL, JobField.FAILURES, JobField.ATTEMPTS,
          JobField.LOST, JobField.UNSENT_RUNS, JobField.DEFERRALS)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    """Three hosts; listed before the process fixtures, so that the workers in them are
    stopped before the namespaces go."""
    why = netns_problem()
    if why:
        pytest.skip(why)
    with Hosts(3) as hs:
        yield hs


def job_fields(r: redis.Redis, ids: list[str]) -> dict[str, dict[str, str]]:
    pipe = r.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(job_key(job_id), FIELDS)
    return {job_id: {f: (v or b"").decode() for f, v in zip(FIELDS, vals, strict=True)}
            for job_id, vals in zip(ids, pipe.execute(), strict=True)}


def results(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    res = run_cli(["results", BATCH], env)
    assert res.returncode == 0, res.stderr
    return {d["id"]: d for d in map(json.loads, res.stdout.splitlines())}


def test_a_host_cut_off_mid_batch_is_taken_over_and_changes_nothing_when_back(
    broker: dict[str, str], hosts: Hosts, r: redis.Redis, tmp_path: Path, simulator: Callable[..., str],
    start_process: Callable[..., Proc], chaos_env: dict[str, str],
) -> None:
    base = simulator("--latency-ms", "300", "--parallel", "64")
    env = {**chaos_env, **broker, "MEDQ_LLM__BASE_URL": base, "MEDQ_LLM__MAX_IN_FLIGHT": "32"}
    # Every host calls Redis, RabbitMQ and the simulator by the same URLs, each over its own link.
    on_hosts = {**env, "MEDQ_REDIS_URL": hosts.reach(env["MEDQ_REDIS_URL"]), "MEDQ_LLM__BASE_URL": hosts.reach(base)}
    if "MEDQ_BROKER_URL" in broker:
        on_hosts["MEDQ_BROKER_URL"] = hosts.reach(broker["MEDQ_BROKER_URL"])
    broker_name = "RabbitMQ" if broker else "Redis"
    workers = {h.index: start_process(h.command([MEDQ, "worker", "-c", "4"]), on_hosts, name=f"worker-h{h.index}")
               for h in hosts}
    for w in workers.values():
        wait_log(w, " ready.", timeout_s=90)
    enqueue(env, write_records(tmp_path / "recs.jsonl", N), BATCH)
    ids = job_ids(r, BATCH)
    lease_s = float(env["MEDQ_WORKER__LEASE_S"])

    at_cut: dict[str, dict[str, str]] = {}  # the jobs running with a lease when the link went
    held: list[str] = []  # those of them whose lease nobody renewed: the cut-off host's
    cut_at: list[float] = []  # wall clock (result documents' finished_at is too)
    looked: list[bool] = []
    started = time.monotonic()

    def cut_then_look(c: Counter[str]) -> None:
        if not cut_at and c[JobStatus.SUCCEEDED.value] >= N // 3:
            hosts[CUT].cut("blackhole")
            cut_at.append(time.time())
            at_cut.update({j: f for j, f in job_fields(r, ids).items() if f[JobField.STATUS] == "running"})
        elif cut_at and not looked and time.time() - cut_at[0] > lease_s * 0.8:
            # The live hosts renew every third of a lease; a run of theirs has renewed by now
            # (or finished). A lease still as it was at the cut is held by a run that cannot
            # reach Redis. Nothing else can have taken it yet (that takes the lease to lapse
            # and a message to come back).
            now = job_fields(r, list(at_cut))
            looked.append(True)
            held.extend(j for j, f in at_cut.items()
                        if now[j][JobField.RUN_ID] == f[JobField.RUN_ID] and now[j][JobField.LEASE_UNTIL] == f[JobField.LEASE_UNTIL])

    c = wait_done(r, BATCH, N, timeout_s=150, tick=cut_then_look)
    batch_s = time.monotonic() - started
    assert cut_at and held, (c, len(at_cut))  # the cut came mid-batch and caught running jobs
    assert workers[CUT].popen.poll() is None, workers[CUT].log[-3000:]  # a partition, not a crash
    done = job_fields(r, ids)
    before = results(env)
    # Finished while the host was cut off, so by the other hosts: its link moves no byte while cut.
    assert all(done[j][JobField.STATUS] == "succeeded" for j in held), {j: done[j] for j in held}
    finished = [datetime.fromisoformat(before[d]["finished_at"]).timestamp()
                for d in before if before[d]["job_id"] in held]
    recovery_s = max(finished) - cut_at[0]
    moved_at_restore = hosts[CUT].moved

    hosts[CUT].restore()
    # The stale runs get their say: what waited in the link arrives now; their retries
    # and the orphan sweep come within a few leases.
    time.sleep(4 * lease_s)
    wait_done(r, BATCH, N, timeout_s=60)
    spoke = hosts[CUT].moved - moved_at_restore
    after = results(env)
    later = job_fields(r, ids)
    o = outcome(r, env, BATCH, N)

    changed = sorted(k for k in before if before[k] != after.get(k))
    charged = {j: (done[j][JobField.FAILURES], later[j][JobField.FAILURES]) for j in ids
               if int(later[j][JobField.FAILURES] or 0) > int(done[j][JobField.FAILURES] or 0)}
    reran = sum(int(later[j][JobField.ATTEMPTS] or 0) > int(done[j][JobField.ATTEMPTS] or 0) for j in ids)
    lost_runs = sum(int(done[j][JobField.LOST] or 0) for j in held)
    figures = (f"{len(at_cut)} jobs running at the cut, {len(held)} of them on host {CUT}, all finished elsewhere "
               f"{recovery_s:.1f} s after the cut ({lost_runs} lost runs counted); batch {batch_s:.0f} s; "
               f"after the restore ({spoke} bytes from host {CUT}): {len(changed)} results changed, "
               f"{len(charged)} jobs charged a failure again, {reran} ran again; duplicated {o.duplicated}")
    print(figures)
    record(f"3 hosts (network namespaces), host {CUT}'s links black-holed at 1/3 of {N}, back after the batch "
           f"({broker_name} broker)", o,
           figures)
    assert (o.succeeded, o.failed, o.lost, o.duplicated, o.results) == (N, 0, 0, 0, N), o
    assert spoke > 0  # the host did come back and talk: what follows is not vacuous
    assert not changed, {k: (before[k], after.get(k)) for k in changed[:3]}
    assert not charged, charged
