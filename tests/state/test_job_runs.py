"""A run's steps on the job hash (medq.state.jobs), on the real Redis: what a worker's
death is charged as, and what a stale run (its worker cut off past its lease) may still write."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis
import redis.asyncio

from medq.core.contract import JobField, failed_key, job_key
from medq.state import jobs
from medq.state.jobs import JobDefaults, Wrote

LEASE_MS = 100


class Calls:
    """``jobs.ScriptCalls`` straight over a client, one call at a time (the worker batches them)."""

    def __init__(self, url: str) -> None:
        self.r = redis.Redis.from_url(url, decode_responses=True)

    async def script(self, source: str, keys: list[str], args: list[Any]) -> Any:
        return self.r.eval(source, len(keys), *keys, *args)


def _job(r: redis.Redis, record_id: str = "rec-1") -> jobs.Job:
    run = JobDefaults(batch="runs", schema="clinical_note", schema_version=1, now_iso=jobs.now_iso(),
                      payload_ttl_s=600, replaced_ttl_s=600)
    [(_, job_id)] = jobs.create_jobs(r, run, [(record_id, '{"text": "x"}', "d1")], 0)
    return jobs.Job(job_id, "runs", record_id, "clinical_note", 1)


def _start(calls: Calls, job: jobs.Job, run_id: str, mode: str) -> jobs.Start:
    return asyncio.run(jobs.start(calls, job.job_id, run_id, lease_ms=LEASE_MS, max_lost_runs=3, mode=mode))


def _field(r: redis.Redis, job: jobs.Job, name: str) -> int:
    return int(r.hget(job_key(job.job_id), name) or 0)


def _lapse() -> None:
    time.sleep(LEASE_MS / 1000 + 0.05)


def test_a_stale_run_writes_no_retry_and_no_dead_letter_once_another_run_took_the_job(r: redis.Redis, redis_url: str) -> None:
    calls = Calls(redis_url)
    job = _job(r)
    assert _start(calls, job, "run-a", "1").verdict == "run"
    _lapse()  # run-a's worker is cut off: its lease lapses
    assert _start(calls, job, "run-b", "0").verdict == "gate"
    took = _start(calls, job, "run-b", "2")
    assert took.verdict == "run" and took.run is not None and took.run.lost == 1

    async def stale_run_comes_back() -> tuple[Wrote, Wrote]:
        retried = await jobs.put_back(calls, job, "run-a", counter=JobField.FAILURES, due_ms=0, error_kind="timeout",
                                      error_message="timed out", unsent=False)
        failed = await jobs.fail(calls, job, "run-a", error_kind="bad_request", error_message="400", failed_at_s=0)
        return retried, failed

    assert asyncio.run(stale_run_comes_back()) == (Wrote.STALE, Wrote.STALE)
    assert _field(r, job, JobField.FAILURES) == 0  # nothing charged by the stale run
    assert r.hget(job_key(job.job_id), JobField.STATUS) == b"running"  # run-b still has it
    assert r.zscore(failed_key("runs"), job.job_id) is None

    wrote = asyncio.run(jobs.put_back(calls, job, "run-b", counter=JobField.FAILURES, due_ms=0, error_kind="timeout",
                                      error_message="timed out", unsent=False))
    assert wrote is Wrote.WRITTEN and _field(r, job, JobField.FAILURES) == 1


def test_a_death_among_suspects_is_charged_to_none_and_sends_each_to_run_alone(r: redis.Redis, redis_url: str) -> None:
    calls = Calls(redis_url)
    job = _job(r)
    assert _start(calls, job, "run-a", "1").verdict == "run"
    _lapse()  # the worker died with the job and its companions
    gate = _start(calls, job, "run-b", "0")
    assert (gate.verdict, gate.alone) == ("gate", False)  # one lost run: it may run among suspects
    assert _start(calls, job, "run-b", "3").verdict == "run"
    assert _field(r, job, JobField.LOST) == 1
    _lapse()  # and died again, among suspects: whose record was it?
    gate = _start(calls, job, "run-c", "0")
    assert (gate.verdict, gate.alone) == ("gate", True)
    assert _start(calls, job, "run-c", "3").verdict == "gate"  # not among suspects any more
    assert _start(calls, job, "run-c", "2").verdict == "run"
    assert (_field(r, job, JobField.LOST), _field(r, job, JobField.SPARED)) == (1, 1)
    _lapse()  # alone, twice: its own deaths make it a poison job
    assert _start(calls, job, "run-d", "2").verdict == "run"
    _lapse()
    poison = _start(calls, job, "run-e", "2")
    assert (poison.verdict, poison.lost) == ("poison", 3)


def test_suspects_sent_together_run_among_suspects_and_one_that_must_run_alone_is_sent_on(
    r: redis.Redis, redis_url: str
) -> None:
    calls = Calls(redis_url)
    job = _job(r)
    assert _start(calls, job, "run-a", "1").verdict == "run"
    _lapse()  # its worker was killed: the orphan sweep sends it with the other lost jobs, in one message
    gate = _start(calls, job, "run-b", "1")
    assert (gate.verdict, gate.alone) == ("gate", False)  # held in the message: it runs among suspects
    assert _field(r, job, JobField.LOST) == 0  # nothing written before its turn: the death is counted once
    assert _start(calls, job, "run-b", "3").verdict == "run"
    assert _field(r, job, JobField.LOST) == 1
    _lapse()  # died again, among suspects: nobody can pin it
    sent_on = _start(calls, job, "run-c", "1")
    assert sent_on.verdict == "alone"  # not held: the message's other jobs would wait for its turn alone
    assert (_field(r, job, JobField.LOST), _field(r, job, JobField.SPARED)) == (1, 1)
    gate = _start(calls, job, "run-c", "0")  # its message of its own
    assert (gate.verdict, gate.alone) == ("gate", True)
    assert _start(calls, job, "run-c", "2").verdict == "run"


def test_a_peek_while_suspects_run_starts_no_healthy_job_but_answers_a_suspect_at_once(
    r: redis.Redis, redis_url: str
) -> None:
    calls = Calls(redis_url)
    healthy, suspect = _job(r), _job(r, "rec-2")

    def peek(job: jobs.Job, mode: str) -> jobs.Start:
        return asyncio.run(jobs.start(calls, job.job_id, "run-p", lease_ms=LEASE_MS, max_lost_runs=3, mode=mode,
                                      peek=True))

    assert peek(healthy, "1").verdict == "healthy"
    assert r.hget(job_key(healthy.job_id), JobField.STATUS) == b"queued"  # not started: it waits for its turn
    assert _start(calls, suspect, "run-a", "1").verdict == "run"
    _lapse()  # its worker died
    gate = peek(suspect, "1")
    assert (gate.verdict, gate.alone) == ("gate", False)  # joins the suspects at once
    assert _field(r, suspect, JobField.LOST) == 0


def test_a_job_whose_own_deaths_reach_the_limit_is_poison_also_when_sent_again_among_others(
    r: redis.Redis, redis_url: str
) -> None:
    calls = Calls(redis_url)
    job = _job(r)
    assert _start(calls, job, "run-a", "1").verdict == "run"
    _lapse()  # died beside healthy jobs: lost run 1
    assert _start(calls, job, "run-b", "0").alone is False
    assert _start(calls, job, "run-b", "2").verdict == "run"  # alone (as a suspect on its own runs)
    _lapse()  # died alone: lost run 2; the orphan sweep sends it with other lost jobs
    assert _start(calls, job, "run-c", "1").verdict == "alone"  # a death from poison: sent on to run alone
    assert _start(calls, job, "run-c", "0").alone is True
    assert _start(calls, job, "run-c", "2").verdict == "run"
    _lapse()  # died alone again, and comes back in a message of many
    poison = _start(calls, job, "run-d", "1")
    assert (poison.verdict, poison.lost) == ("poison", 3)  # not run once more


def test_a_job_sent_again_is_sent_once_more_only_after_a_hold_that_doubles(r: redis.Redis, redis_url: str) -> None:
    calls = Calls(redis_url)
    job = _job(r)
    assert _start(calls, job, "run-a", "1").verdict == "run"
    _lapse()  # its worker died

    def claim() -> list[str]:
        async def go() -> list[str]:
            ar = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
            try:
                return await jobs.claim_orphans(ar, grace_ms=0, hold_min_ms=300, hold_max_ms=1000)
            finally:
                await ar.aclose()
        return asyncio.run(go())

    assert claim() == [job.job_id]
    assert claim() == []  # held: one sweep sends it, not every sweep
    time.sleep(0.35)
    assert claim() == [job.job_id]  # its copy did not start within the hold (lost again): sent again
    time.sleep(0.35)
    assert claim() == []  # the hold doubled to 600 ms
    time.sleep(0.3)
    assert claim() == [job.job_id]
    assert _field(r, job, JobField.RESENT) == 3
