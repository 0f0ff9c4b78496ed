"""Plain helpers of the chaos tests: records, enqueueing, waiting, how a batch ended,
killing workers, and the rows of the table conftest.py prints at the end of the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from medq.core.contract import JobStatus, job_key
from medq.state.jobs import counts, iter_states
from tests.helpers import REPO, Proc, run_cli

ARTIFACTS = REPO / "tests" / "artifacts"
ROWS: list[dict[str, Any]] = []  # one per ``record``: the chaos table


@dataclass
class Outcome:
    """How a batch ended, from medq's own commands (status, results)."""

    jobs: int
    succeeded: int
    failed: int
    unfinished: int
    results: int  # lines in `medq results`
    duplicated: int  # result lines beyond one per record
    failed_kinds: dict[str, int] = field(default_factory=dict)
    rerun: int = 0  # jobs that ran again after a lost worker (their first stored result kept)

    @property
    def lost(self) -> int:
        """Jobs with neither a final state nor a result."""
        return self.unfinished + max(self.jobs - self.succeeded - self.failed - self.unfinished, 0)


def write_records(path: Path, n: int, prefix: str = "r") -> Path:
    with path.open("w") as fh:
        for i in range(n):
            text = f"Patient {i} is a {20 + i % 60}-year-old with hypertension, on metoprolol 50 mg daily."
            fh.write(json.dumps({"id": f"{prefix}{i:04d}", "text": text}) + "\n")
    return path


def enqueue(env: dict[str, str], path: Path, batch: str) -> None:
    res = run_cli(["enqueue", str(path), "--schema", "clinical_note", "--batch", batch], env)
    assert res.returncode == 0, res.stderr


def wait_done(r: redis.Redis, batch: str, n: int, timeout_s: float, tick: Callable[[Counter[str]], None] | None = None) -> Counter[str]:
    """Poll until every job is final; ``tick`` runs each poll (the chaos)."""
    deadline = time.monotonic() + timeout_s
    c: Counter[str] = Counter()
    while time.monotonic() < deadline:
        try:
            c = counts(r, batch)
        except redis.ConnectionError:
            time.sleep(0.2)
            continue
        if c[JobStatus.SUCCEEDED.value] + c[JobStatus.FAILED.value] >= n:
            return c
        if tick is not None:
            tick(c)
        time.sleep(0.2)
    return c


def outcome(r: redis.Redis, env: dict[str, str], batch: str, n: int) -> Outcome:
    c = counts(r, batch)
    res = run_cli(["results", batch], env)
    assert res.returncode == 0, res.stderr
    docs = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    per_record = Counter(d["id"] for d in docs)
    states = list(iter_states(r, batch))
    rerun = sum(1 for st in states if int(r.hget(job_key(st.job_id), "lost") or 0) > 0)
    kinds = Counter(st.error_kind or "?" for st in states if st.status == JobStatus.FAILED.value)
    return Outcome(
        jobs=n,
        succeeded=c[JobStatus.SUCCEEDED.value],
        failed=c[JobStatus.FAILED.value],
        unfinished=sum(c[s.value] for s in JobStatus if not s.is_final),
        results=len(docs),
        duplicated=sum(k - 1 for k in per_record.values() if k > 1) + max(len(docs) - n, 0),
        failed_kinds=dict(kinds),
        rerun=rerun,
    )


def record(scenario: str, o: Outcome, notes: str = "") -> None:
    ROWS.append({"scenario": scenario, **o.__dict__, "lost": o.lost, "notes": notes})


def kill_group(proc: Proc) -> None:
    """kill -9 a worker and everything it started (the main process and its children)."""
    try:
        os.killpg(proc.popen.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.popen.wait(10)


def kill_children(proc: Proc) -> int:
    """kill -9 a prefork worker's pool processes; the main process stays and replaces them."""
    out = subprocess.run(["pgrep", "-P", str(proc.popen.pid)], capture_output=True, text=True).stdout.split()
    for pid in out:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(out)


class KillWhileRunning:
    """A record that "kills its worker": each run of the job (a new run id) calls ``kill``
    (``lambda: kill_children(w)``: a prefork worker's pool processes), which says whether it
    killed anything. Pass it as ``wait_done``'s ``tick``; ``killed`` holds the runs killed."""

    def __init__(self, r: redis.Redis, job_id: str, kill: Callable[[], object]) -> None:
        self.r, self.job_id, self.kill = r, job_id, kill
        self.killed: list[bytes] = []

    def __call__(self, _: Counter[str]) -> None:
        status, run_id = self.r.hmget(job_key(self.job_id), "status", "run_id")
        if status == b"running" and run_id and run_id not in self.killed and self.kill():
            self.killed.append(run_id)


def chaos_table(rows: list[dict[str, Any]]) -> list[str]:
    """The chaos table (markdown) of ``rows``, written to tests/artifacts/chaos.md too."""
    lines = [
        "| scenario | jobs | succeeded | failed (kind) | lost | duplicated | re-run after a lost worker | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda row: row["scenario"]):
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(row["failed_kinds"].items()))
        lines.append(
            f"| {row['scenario']} | {row['jobs']} | {row['succeeded']} | {row['failed']}"
            f"{f' ({kinds})' if kinds else ''} | {row['lost']} | {row['duplicated']} | {row['rerun']} | {row['notes']} |"
        )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "chaos.md").write_text("\n".join(lines) + "\n")
    return lines
