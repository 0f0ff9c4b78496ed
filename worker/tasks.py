"""Celery tasks: thin. The job's life is in ``worker.jobs``."""

from __future__ import annotations

from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject

from medq.contract import TASK_EXTRACT
from worker.celery_app import app
from worker.jobs import RetryLater, get_runner


@app.task(name=TASK_EXTRACT, bind=True, max_retries=None)
def extract(self: Task, job_id: str) -> dict[str, Any]:
    """Run one extraction job. Args are the job id only; the record stays in its store.

    Retry budgets are counted in the job's state, not in Celery's ``retries``: a job
    put back for back-pressure must not use up the budget of its failures."""
    try:
        outcome = get_runner().run(job_id)
    except redis.RedisError as exc:
        # Redis is unreachable: nothing about the job can be recorded. Put the message
        # back (or, if that fails too, leave it unacknowledged for redelivery).
        raise Reject(f"job {job_id}: Redis unavailable ({type(exc).__name__})", requeue=True) from None
    if isinstance(outcome, RetryLater):
        raise self.retry(countdown=outcome.countdown_s, exc=outcome.error)
    return outcome
