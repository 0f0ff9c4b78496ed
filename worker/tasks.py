"""Celery tasks: thin. The job's life is in ``worker.runner``; the work runs on the
process's engine (``worker.engine``: one asyncio loop), the task waits for it.

- ``medq.extract(job_id)``: one job (CONTRACT: what another service sends).
- ``medq.extract_many(job_ids)``: several jobs in one message, run side by side. The
  producer sends these: one message per job costs the worker more CPU in Celery
  (consume, ack, events, logs) than the job itself against a fast endpoint.
"""

from __future__ import annotations

from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject

import worker.signals  # noqa: F401 - registers the worker's signal handlers (start-up checks, the engine)
from medq.core.contract import TASK_EXTRACT, TASK_EXTRACT_MANY
from medq.state.connect import connect
from worker.celery_app import app, settings
from worker.engine import get_engine
from worker.messages import PutBack, run_message, run_while_full, while_full
from worker.runner import RetryLater


@app.task(name=TASK_EXTRACT, bind=True, max_retries=None)
def extract(self: Task, job_id: str) -> dict[str, Any]:
    """Run one extraction job. Args are the job id only; the record stays in its store.

    Retry budgets are counted in the job's state, not in Celery's ``retries``: a job
    put back for back-pressure must not use up the budget of its failures."""
    outcome = run_while_full(get_engine(app), _redis, [job_id])[0]
    if isinstance(outcome, redis.RedisError):
        # Redis is unreachable: nothing about the job can be recorded. Put the message
        # back (or, if that fails too, leave it unacknowledged for redelivery).
        raise Reject(f"job {job_id}: Redis unavailable ({type(outcome).__name__})", requeue=True) from None
    if isinstance(outcome, BaseException):
        raise outcome
    if isinstance(outcome, RetryLater):
        later = outcome
        if not later.queue:  # (a schema version's queue may lose its last reader: watched by lease)
            get_engine(app).sent_back([job_id], later.countdown_s)
        # Task.retry sends the retry and raises Retry, which leaves through while_full
        while_full(_redis, f"the retry of job {job_id} waits",
                   lambda: self.retry(countdown=later.countdown_s, exc=later.error, queue=later.queue))
    assert isinstance(outcome, dict)
    return outcome


_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    """A plain client, to read INFO for the "Redis is full" line."""
    global _client
    if _client is None:
        _client = connect(settings.redis_url)
    return _client


@app.task(name=TASK_EXTRACT_MANY, bind=True, max_retries=None)
def extract_many(self: Task, job_ids: list[str]) -> dict[str, Any]:
    """Run several jobs side by side (``worker.messages.run_message``). Returns counts (ids
    only, no record data); the message goes back whole when it must (``PutBack``)."""
    try:
        return run_message(get_engine(app), app, _redis, list(job_ids))
    except PutBack as exc:
        raise Reject(str(exc), requeue=True) from None
