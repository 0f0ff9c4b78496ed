"""What a task message does with its jobs, whoever took it off the broker: a Celery task
(``worker.tasks``) or the burst runner in a process of its own (``worker.burst``).

- The jobs run side by side on the process's engine. Those that Redis refused for want
  of memory wait for room and run again (a full Redis is back-pressure, not the jobs'
  fault); meanwhile the message stays unacknowledged.
- Jobs to retry go back with their countdown, together when their countdowns end within
  the same second (``retry_messages``): sent one a message, each would hold a pool thread
  for a whole call, and a process of ``-c 4`` would run 4 of them at a time whatever the
  endpoint takes. A suspect that must run alone goes back as its own ``medq.extract``; a
  job of a schema version this worker has not loaded goes to that version's queue.
  A job that failed was recorded as failed (dead letters) by the runner.
- If Redis is unreachable, a job raised outside the runner, or the retries cannot be
  sent, the whole message goes back (:class:`PutBack`): the jobs already finished are
  then found finished and not run again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import redis

from medq.core.contract import QUEUE
from medq.core.errors import PermanentError
from medq.state.dispatch import TaskSender, send_jobs
from medq.state.memory import is_full, wait_for_room
from worker.engine import Engine
from worker.runner import Outcome, RetryLater

log = logging.getLogger("medq.worker")

JobOutcome = Outcome | RetryLater | BaseException


class PutBack(Exception):
    """The message goes back to the broker whole; the reason names ids and error types only."""


def run_while_full(engine: Engine, client: Callable[[], redis.Redis], job_ids: list[str]) -> list[JobOutcome]:
    """Run the jobs; those that Redis refused for want of memory wait for room and run again.
    ``client``: a plain Redis client, to read INFO for the "Redis is full" line."""
    outcomes = engine.run_many(job_ids)
    attempt = 0
    while full := [i for i, o in enumerate(outcomes) if isinstance(o, BaseException) and is_full(o)]:
        wait_for_room(client(), f"{len(full)} job(s) wait", attempt)
        attempt += 1
        for i, again in zip(full, engine.run_many([job_ids[i] for i in full]), strict=True):
            outcomes[i] = again
    return outcomes


def while_full(client: Callable[[], redis.Redis], what: str, send: Callable[[], object]) -> None:
    """Send a message, waiting for room while Redis is full."""
    attempt = 0
    while True:
        try:
            send()
            return
        except Exception as exc:  # noqa: BLE001 - kombu wraps the Redis error in its own
            if not is_full(exc):
                raise
            wait_for_room(client(), what, attempt)
            attempt += 1


def run_message(engine: Engine, app: TaskSender, client: Callable[[], redis.Redis],
                job_ids: list[str]) -> dict[str, Any]:
    """Run a message's jobs and send their retries. Returns counts (ids only, no record
    data); raises :class:`PutBack` when the message must go back whole."""
    outcomes = run_while_full(engine, client, list(job_ids))
    counts = {"jobs": len(job_ids), "succeeded": 0, "failed": 0, "retrying": 0, "other": 0}
    retries: list[tuple[str, RetryLater]] = []
    for job_id, outcome in zip(job_ids, outcomes, strict=True):
        if isinstance(outcome, redis.RedisError):
            raise PutBack(f"{len(job_ids)} jobs: Redis unavailable ({type(outcome).__name__})")
        if isinstance(outcome, RetryLater):
            retries.append((job_id, outcome))
            counts["retrying"] += 1
        elif isinstance(outcome, PermanentError):
            counts["failed"] += 1
        elif isinstance(outcome, BaseException):
            # Not a job outcome (the runner records those): a bug. Log its type only.
            log.error("job %s: %s outside the job runner; message put back", job_id, type(outcome).__name__)
            raise PutBack(f"{len(job_ids)} jobs: internal error ({type(outcome).__name__})")
        elif outcome.get("status") == "succeeded":
            counts["succeeded"] += 1
        elif outcome.get("status") == "failed":
            counts["failed"] += 1
        else:
            counts["other"] += 1
    try:
        queues: dict[str, list[tuple[str, RetryLater]]] = {}
        for job_id, later in retries:
            queues.setdefault(later.queue or QUEUE, []).append((job_id, later))
        for queue, queued in queues.items():
            for ids, countdown_s in retry_messages(queued):
                if queue == QUEUE:  # (a schema version's queue may lose its last reader: watched by lease)
                    engine.sent_back(ids, countdown_s)
                while_full(client, f"the retry of job(s) {', '.join(ids[:3])} waits",
                           lambda: send_jobs(app, ids, per_message=len(ids),  # noqa: B023 - called at once
                                             countdown_s=countdown_s, queue=queue))  # noqa: B023
    except Exception as exc:  # the broker is gone: keep the message, send nothing twice
        raise PutBack(f"{len(job_ids)} jobs: could not send retries ({type(exc).__name__})") from None
    return counts


def retry_messages(retries: list[tuple[str, RetryLater]]) -> list[tuple[list[str], float]]:
    """The messages that send a message's retries again: ``(job ids, countdown)``. Jobs whose
    countdowns end within the same second go together, with the latest of their countdowns
    (none runs sooner than it was told, at most a second later); one that must run alone
    goes on its own."""
    alone = [([job_id], later.countdown_s) for job_id, later in retries if later.own_message]
    by_second: dict[int, list[tuple[str, float]]] = {}
    for job_id, later in retries:
        if not later.own_message:
            by_second.setdefault(math.ceil(later.countdown_s), []).append((job_id, later.countdown_s))
    together = [([j for j, _ in group], max(c for _, c in group)) for _, group in sorted(by_second.items())]
    return alone + together
