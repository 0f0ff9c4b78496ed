"""Celery tasks: thin. The job's life is in ``worker.jobs``; the work runs on the
process's engine (one asyncio loop), the task waits for it.

- ``medq.extract(job_id)``: one job (CONTRACT: what another service sends).
- ``medq.extract_many(job_ids)``: several jobs in one message, run side by side. The
  producer sends these: one message per job costs the worker more CPU in Celery
  (consume, ack, events, logs) than the job itself against a fast endpoint.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject

from medq.contract import QUEUE, TASK_EXTRACT, TASK_EXTRACT_MANY
from medq.errors import PermanentError
from worker.celery_app import app
from worker.jobs import RetryLater, get_engine

log = logging.getLogger("medq.worker")


@app.task(name=TASK_EXTRACT, bind=True, max_retries=None)
def extract(self: Task, job_id: str) -> dict[str, Any]:
    """Run one extraction job. Args are the job id only; the record stays in its store.

    Retry budgets are counted in the job's state, not in Celery's ``retries``: a job
    put back for back-pressure must not use up the budget of its failures."""
    try:
        outcome = get_engine().run(job_id)
    except redis.RedisError as exc:
        # Redis is unreachable: nothing about the job can be recorded. Put the message
        # back (or, if that fails too, leave it unacknowledged for redelivery).
        raise Reject(f"job {job_id}: Redis unavailable ({type(exc).__name__})", requeue=True) from None
    if isinstance(outcome, RetryLater):
        raise self.retry(countdown=outcome.countdown_s, exc=outcome.error)
    return outcome


@app.task(name=TASK_EXTRACT_MANY, bind=True, max_retries=None)
def extract_many(self: Task, job_ids: list[str]) -> dict[str, Any]:
    """Run several jobs side by side. Returns counts (ids only, no record data).

    A job to retry goes back as its own ``medq.extract`` message with its countdown;
    a job that failed is recorded as failed (dead letters). If Redis is unreachable,
    or the retries cannot be sent, the whole message goes back: the jobs already
    finished are then found finished and not run again."""
    outcomes = get_engine().run_many(list(job_ids))
    counts = {"jobs": len(job_ids), "succeeded": 0, "failed": 0, "retrying": 0, "other": 0}
    retries: list[tuple[str, RetryLater]] = []
    for job_id, outcome in zip(job_ids, outcomes):
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
            extract.apply_async((job_id,), countdown=later.countdown_s, task_id=job_id, queue=QUEUE)
    except Exception as exc:  # the broker is gone: keep the message, send nothing twice
        raise Reject(f"{len(job_ids)} jobs: could not send retries ({type(exc).__name__})", requeue=True) from None
    return counts
