"""Celery tasks: thin. The job's life is in ``worker.runner``; the work runs on the
process's engine (``worker.engine``: one asyncio loop), the task waits for it.

- ``medq.extract(job_id)``: one job (CONTRACT: what another service sends).
- ``medq.extract_many(job_ids)``: several jobs in one message, run side by side. The
  producer sends these: one message per job costs the worker more CPU in Celery
  (consume, ack, events, logs) than the job itself against a fast endpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject

import worker.signals  # noqa: F401 - registers the worker's signal handlers (start-up checks, the engine)
from medq.core.contract import TASK_EXTRACT, TASK_EXTRACT_MANY
from medq.core.errors import PermanentError
from medq.state.connect import connect
from medq.state.dispatch import send_job
from medq.state.memory import is_full, wait_for_room
from worker.celery_app import app, settings
from worker.engine import get_engine
from worker.runner import RetryLater

log = logging.getLogger("medq.worker")


@app.task(name=TASK_EXTRACT, bind=True, max_retries=None)
def extract(self: Task, job_id: str) -> dict[str, Any]:
    """Run one extraction job. Args are the job id only; the record stays in its store.

    Retry budgets are counted in the job's state, not in Celery's ``retries``: a job
    put back for back-pressure must not use up the budget of its failures."""
    outcome = _run_while_full([job_id])[0]
    if isinstance(outcome, redis.RedisError):
        # Redis is unreachable: nothing about the job can be recorded. Put the message
        # back (or, if that fails too, leave it unacknowledged for redelivery).
        raise Reject(f"job {job_id}: Redis unavailable ({type(outcome).__name__})", requeue=True) from None
    if isinstance(outcome, BaseException):
        raise outcome
    if isinstance(outcome, RetryLater):
        later = outcome
        # Task.retry sends the retry and raises Retry, which leaves through _while_full
        _while_full(f"the retry of job {job_id} waits", lambda: self.retry(countdown=later.countdown_s, exc=later.error))
    assert isinstance(outcome, dict)
    return outcome


def _run_while_full(job_ids: list[str]) -> list[dict[str, Any] | RetryLater | BaseException]:
    """Run the jobs; those that Redis refused for want of memory wait for room and run
    again (a full Redis is back-pressure, not the jobs' fault). Until then the message
    stays unacknowledged and the worker stays up."""
    outcomes = get_engine(app).run_many(job_ids)
    attempt = 0
    while full := [i for i, o in enumerate(outcomes) if isinstance(o, BaseException) and is_full(o)]:
        wait_for_room(_redis(), f"{len(full)} job(s) wait", attempt)
        attempt += 1
        for i, again in zip(full, get_engine(app).run_many([job_ids[i] for i in full]), strict=True):
            outcomes[i] = again
    return outcomes


def _while_full(what: str, send: Callable[[], object]) -> None:
    """Send a message, waiting for room while Redis is full."""
    attempt = 0
    while True:
        try:
            send()
            return
        except Exception as exc:  # noqa: BLE001 - kombu wraps the Redis error in its own
            if not is_full(exc):
                raise
            wait_for_room(_redis(), what, attempt)
            attempt += 1


_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    """A plain client, to read INFO for the "Redis is full" line."""
    global _client
    if _client is None:
        _client = connect(settings.redis_url)
    return _client


@app.task(name=TASK_EXTRACT_MANY, bind=True, max_retries=None)
def extract_many(self: Task, job_ids: list[str]) -> dict[str, Any]:
    """Run several jobs side by side. Returns counts (ids only, no record data).

    A job to retry goes back as its own ``medq.extract`` message with its countdown;
    a job that failed is recorded as failed (dead letters). If Redis is unreachable,
    or the retries cannot be sent, the whole message goes back: the jobs already
    finished are then found finished and not run again."""
    outcomes = _run_while_full(list(job_ids))
    counts = {"jobs": len(job_ids), "succeeded": 0, "failed": 0, "retrying": 0, "other": 0}
    retries: list[tuple[str, RetryLater]] = []
    for job_id, outcome in zip(job_ids, outcomes, strict=True):
        if isinstance(outcome, redis.RedisError):
            raise Reject(f"{len(job_ids)} jobs: Redis unavailable ({type(outcome).__name__})", requeue=True)
        if isinstance(outcome, RetryLater):
            retries.append((job_id, outcome))
            counts["retrying"] += 1
        elif isinstance(outcome, PermanentError):
            counts["failed"] += 1
        elif isinstance(outcome, BaseException):
            # Not a job outcome (the runner records those): a bug. Log its type only.
            log.error("job %s: %s outside the job runner; message put back", job_id, type(outcome).__name__)
            raise Reject(f"{len(job_ids)} jobs: internal error ({type(outcome).__name__})", requeue=True)
        elif outcome.get("status") == "succeeded":
            counts["succeeded"] += 1
        elif outcome.get("status") == "failed":
            counts["failed"] += 1
        else:
            counts["other"] += 1
    try:
        for job_id, later in retries:
            _while_full(f"the retry of job {job_id} waits",
                        lambda: send_job(app, job_id, countdown_s=later.countdown_s))  # noqa: B023 - called at once
    except Exception as exc:  # the broker is gone: keep the message, send nothing twice
        raise Reject(f"{len(job_ids)} jobs: could not send retries ({type(exc).__name__})", requeue=True) from None
    return counts
