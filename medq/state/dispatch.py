"""Sending jobs: the one place that writes ``medq.extract`` / ``medq.extract_many`` messages.

The producer (new jobs, ``medq requeue``), the tasks (a job put back with its countdown)
and the worker's orphan sweep (a job whose message was lost) all send through here, so
a message's shape (CONTRACT: ids only, a lone job's task id is its job id) is written
once. The Celery app is passed in: this module imports neither celery nor the worker.
"""

from __future__ import annotations

from typing import Any, Protocol

from medq.core.contract import QUEUE, TASK_EXTRACT, TASK_EXTRACT_MANY


class TaskSender(Protocol):
    """What a ``celery.Celery`` app offers for sending (``send_task``)."""

    def send_task(self, name: str, args: Any = None, **options: Any) -> Any: ...


def send_job(app: TaskSender, job_id: str, *, countdown_s: float | None = None, producer: Any = None,
             queue: str = QUEUE) -> None:
    """One job as ``medq.extract``, as another service would send it. Its task id is the
    job id, so Flower and Celery's result name the job. ``countdown_s``: run it no sooner.
    ``queue``: another than ``medq`` (``medq.core.contract.schema_queue``: only the workers
    that have the job's schema version take it)."""
    options: dict[str, Any] = {"task_id": job_id, "queue": queue, "producer": producer}
    if countdown_s is not None:
        options["countdown"] = countdown_s
    app.send_task(TASK_EXTRACT, args=[job_id], **options)


def send_jobs(app: TaskSender, job_ids: list[str], *, per_message: int = 1, countdown_s: float | None = None,
              producer: Any = None, queue: str = QUEUE) -> None:
    """``job_ids`` in groups of ``per_message`` as ``medq.extract_many`` messages (run side
    by side by one worker); a group of one goes as ``medq.extract``. ``countdown_s``: run
    them no sooner. ``producer``: a kombu producer to reuse for all of them
    (``app.producer_or_acquire()``). ``queue``: as for :func:`send_job`."""
    per = max(per_message, 1)
    options: dict[str, Any] = {"queue": queue, "producer": producer}
    if countdown_s is not None:
        options["countdown"] = countdown_s
    for i in range(0, len(job_ids), per):
        group = job_ids[i : i + per]
        if len(group) == 1:
            send_job(app, group[0], countdown_s=countdown_s, producer=producer, queue=queue)
        else:
            app.send_task(TASK_EXTRACT_MANY, args=[group], **options)
