"""Celery tasks: thin. The job's life is in ``worker.jobs``."""

from __future__ import annotations

from typing import Any

from celery import Task

from medq.contract import TASK_EXTRACT
from worker.celery_app import app
from worker.jobs import RetryLater, get_runner


@app.task(name=TASK_EXTRACT, bind=True, max_retries=None)
def extract(self: Task, job_id: str) -> dict[str, Any]:
    """Run one extraction job. Args are the job id only; the record stays in its store."""
    outcome = get_runner().run(job_id, retries=self.request.retries)
    if isinstance(outcome, RetryLater):
        raise self.retry(countdown=outcome.countdown_s, exc=outcome.error)
    return outcome
