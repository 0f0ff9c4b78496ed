"""Burst: work until a batch (or the whole queue) has nothing left to do, then stop.

"Nothing left" (:func:`jobs_left`): with a batch, none of its jobs is queued, running or
retrying; without one, the broker's queue is empty and no started job is running or
waiting for its retry anywhere (the watch, ``medq.state.jobs``). Two drivers use it:

- ``medq worker --burst [BATCH]`` (:class:`BurstStep`): a real Celery worker that stops
  itself, warm, once the check holds twice in a row. For cron jobs, Kubernetes Jobs and
  CI pipelines: "extract tonight's notes, then stop".
- :func:`run_burst`: the same in this process, without Celery's worker: it takes the
  task messages off the broker (kombu), holds those with a countdown until they are due,
  and runs each on an :class:`~worker.engine.Engine` through ``worker.messages``, as the
  tasks do; a message is acknowledged once it has run, or put back whole. Tests use it
  to drain jobs without starting a worker process (like arq's ``Worker(burst=True)``).
"""

from __future__ import annotations

import heapq
import logging
import queue
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import redis
from celery import bootsteps
from kombu.exceptions import ChannelError
from kombu.transport.native_delayed_delivery import (
    bind_queue_to_native_delayed_delivery_exchange,
    declare_native_delayed_delivery_exchanges_and_queues,
)

from medq.core.contract import QUEUE, WATCH_KEY, JobStatus, schema_queue
from medq.core.settings import Settings
from medq.state import jobs
from medq.state.connect import connect
from worker.engine import Engine
from worker.messages import PutBack, run_message

log = logging.getLogger("medq.worker")

UNFINISHED = (JobStatus.QUEUED.value, JobStatus.RUNNING.value, JobStatus.RETRYING.value)


class BatchGone(Exception):
    """The batch has no job states: never enqueued, purged, expired, or Redis lost them."""


def jobs_left(r: redis.Redis, batch: str | None, queued_messages: int = 0) -> int:
    """Jobs that still have work to do: the batch's queued, running and retrying ones; for
    the whole queue, ``queued_messages`` (the broker's queue length, which the caller
    reads from its broker) and the started jobs on the watch. Raises ``BatchGone``."""
    if batch is None:
        return queued_messages + int(r.zcard(WATCH_KEY))
    c = jobs.counts(r, batch)
    if not sum(c.values()):
        raise BatchGone(f"batch {batch} has no jobs (never enqueued, purged, expired, or Redis lost them)")
    return sum(c[s] for s in UNFINISHED)


@dataclass
class BurstReport:
    """How a burst ended. ``exit_code``: 0 all done and succeeded, 1 done with dead letters,
    3 stopped before the work was done (``reason``), 4 the batch's state is gone."""

    batch: str | None
    counts: dict[str, int] = field(default_factory=dict)
    reason: str | None = None  # why it stopped before the work was done
    gone: bool = False

    @property
    def failed(self) -> int:
        return self.counts.get(JobStatus.FAILED.value, 0)

    @property
    def exit_code(self) -> int:
        if self.gone:
            return 4
        if self.reason is not None:
            return 3
        return 1 if self.failed else 0

    def describe(self) -> str:
        what = f"batch {self.batch}" if self.batch else "the queue"
        done = ", ".join(f"{n} {s}" for s, n in self.counts.items() if n) or ("no jobs" if self.batch else "")
        if self.gone:
            return f"{what}: no job states (never enqueued, purged, expired, or Redis lost them)"
        if self.reason is not None:
            return f"{what}: stopped before it was drained ({self.reason})" + (f"; {done}" if done else "")
        tail = f"; see `medq failed {self.batch}`" if self.failed and self.batch else ""
        return f"{what} drained" + (f": {done}{tail}" if done else "")


def batch_counts(r: redis.Redis, batch: str | None) -> dict[str, int]:
    return dict(jobs.counts(r, batch)) if batch else {}


@dataclass(order=True)
class _Held:
    due_s: float
    seq: int
    message: Any = field(compare=False)


def _due_s(message: Any) -> float:
    """When a message's countdown ends (Celery's ``eta`` header), in Unix seconds; 0: now."""
    eta = message.headers.get("eta")
    if not eta:
        return 0.0
    due = datetime.fromisoformat(eta)
    return (due if due.tzinfo else due.replace(tzinfo=timezone.utc)).timestamp()


def _job_ids(message: Any) -> list[str]:
    args = message.payload[0]
    return list(args[0]) if isinstance(args[0], list) else [str(args[0])]


def run_burst(app: Any, batch: str | None = None, *, concurrency: int = 4, timeout_s: float = 300.0,
              poll_s: float = 0.1, stop: threading.Event | None = None, ready: threading.Event | None = None,
              stop_grace_s: float = 10.0) -> BurstReport:
    """Take ``medq`` task messages off the broker of ``app`` (``worker.celery_app.create_app``,
    made from the settings to work with) and run their jobs in this process until
    :func:`jobs_left` is 0 (checked twice, ``poll_s`` apart, with nothing running here),
    or ``timeout_s`` passes. With ``stop``, it works on until that is set instead, as a
    worker does; ``ready`` is set once it takes messages. Messages of other batches taken
    meanwhile run too, as a worker's would. At the end the runs in hand get
    ``stop_grace_s`` to finish; those still running then are cut (their jobs' leases lapse
    and the sweep sends them again), and their messages, like those held for a countdown,
    go back to the broker unrun."""
    settings: Settings = app.medq_settings
    r = connect(settings.redis_url)
    report = BurstReport(batch)
    held: list[_Held] = []
    running: dict[Future[dict[str, Any]], Any] = {}
    seq = 0
    quiet = 0  # consecutive checks that found nothing left
    deadline = time.monotonic() + timeout_s
    engine = Engine(settings, app)
    pool = ThreadPoolExecutor(concurrency, "medq-burst")

    def settle(fut: Future[dict[str, Any]], message: Any) -> None:
        try:
            fut.result()
            message.ack()
        except PutBack as exc:
            log.warning("message put back: %s", exc)
            message.reject(requeue=True)

    try:
        with app.connection_for_read() as conn:
            if settings.broker_is_amqp:
                # What Celery's worker declares at start (its DelayedDelivery step): the exchanges
                # and queues that hold a countdown in RabbitMQ, and the medq queue bound to them.
                declare_native_delayed_delivery_exchanges_and_queues(
                    conn, app.conf.broker_native_delayed_delivery_queue_type)
                bind_queue_to_native_delayed_delivery_exchange(conn, app.amqp.queues[QUEUE])
            inbox = conn.SimpleQueue(app.amqp.queues[QUEUE])
            # as a worker does (``worker.signals``): the queues of the schema versions it has
            # loaded, where a worker without a job's version hands the job on
            handed = [conn.SimpleQueue(app.amqp.queues[schema_queue(name, version)])
                      for name, version in engine.runner.processor.schema_loader.pairs()]
            if ready is not None:
                ready.set()
            while stop is None or not stop.is_set():
                for fut in [f for f in running if f.done()]:
                    settle(fut, running.pop(fut))
                now_s = time.time()
                while held and held[0].due_s <= now_s and len(running) < concurrency:
                    message = heapq.heappop(held).message
                    running[pool.submit(run_message, engine, app, lambda: r, _job_ids(message))] = message
                if len(running) >= concurrency:
                    time.sleep(poll_s / 4)
                    continue
                message = _first(handed)
                if message is None:
                    try:
                        message = inbox.get(block=True, timeout=poll_s)
                    except queue.Empty:
                        message = None
                if message is not None:
                    seq += 1
                    heapq.heappush(held, _Held(_due_s(message), seq, message))
                    quiet = 0
                    continue
                if stop is not None:
                    continue  # a worker: it works on until stopped
                if time.monotonic() > deadline:
                    report.reason = f"not drained within {timeout_s:g}s"
                    break
                if running:
                    quiet = 0
                    continue
                try:
                    left = jobs_left(r, batch, queued_messages(app) if batch is None else 0)
                except BatchGone:
                    report.gone = True
                    break
                quiet = quiet + 1 if left == 0 and (batch is not None or not held) else 0
                if quiet >= 2:
                    break
            engine.stop_taking()  # jobs still in line for the model go back now, uncharged
            done, _ = wait(list(running), timeout=stop_grace_s)
            for fut in done:
                settle(fut, running.pop(fut))
            engine.close()  # cuts what still runs (before its message goes back below)
            for box in (inbox, *handed):
                box.close()  # the messages not acknowledged go back to the broker (kombu restores them)
    finally:
        engine.close()
        pool.shutdown(wait=True, cancel_futures=True)
    if not report.gone:
        report.counts = batch_counts(r, batch)
    r.close()
    return report


def _first(boxes: list[Any]) -> Any:
    """A message from the first of ``boxes`` that has one, without waiting; None if none has."""
    for box in boxes:
        try:
            return box.get(block=False)
        except queue.Empty:
            continue
    return None


def queued_messages(app: Any) -> int:
    """Messages waiting in the broker's ``medq`` queue (Redis or RabbitMQ)."""
    with app.connection_for_read() as conn:
        try:
            return int(conn.default_channel.queue_declare(QUEUE, passive=True).message_count)
        except ChannelError:  # Redis: an empty queue is no key at all, and kombu says it does not exist
            return 0


class BurstStep(bootsteps.StartStopStep):
    """``medq worker --burst [BATCH]`` (``celery worker --burst``): a thread that checks
    :func:`jobs_left` every ``POLL_S`` and, once it is 0 twice in a row with no task in
    this worker's hands, stops the worker warm with :attr:`BurstReport.exit_code` and says
    how the batch ended. Stopped before that (a signal), the worker exits 3."""

    label = "burst"
    POLL_S = 0.5

    def __init__(self, parent: Any, burst: str | None = None, **kwargs: Any) -> None:
        self.enabled = burst is not None
        self.batch = burst or None  # "" (the bare flag): the whole queue
        self._done = threading.Event()
        self._stopping = threading.Event()
        super().__init__(parent, **kwargs)

    def start(self, parent: Any) -> None:
        threading.Thread(target=self._watch, args=(parent,), name="medq-burst", daemon=True).start()

    def stop(self, parent: Any) -> None:
        self._stopping.set()
        if not self._done.is_set():
            what = f"batch {self.batch}" if self.batch else "the queue"
            log.warning("burst: stopped before %s was drained", what)
            print(f"medq worker --burst: stopped before {what} was drained", file=sys.stderr, flush=True)
            parent.exitcode = 3

    def _watch(self, parent: Any) -> None:
        from celery.worker import state  # the running worker's own: what it holds, when it stops

        settings: Settings = parent.app.medq_settings
        r = connect(settings.redis_url)
        quiet = 0
        report = BurstReport(self.batch)
        while not self._stopping.wait(self.POLL_S):
            try:
                left = jobs_left(r, self.batch, queued_messages(parent.app) if self.batch is None else 0)
            except BatchGone:
                report.gone = True
                break
            except Exception as exc:  # noqa: BLE001 - Redis or the broker away: the worker's own retries say so
                log.warning("burst: cannot check what is left (%s)", type(exc).__name__)
                quiet = 0
                continue
            quiet = quiet + 1 if left == 0 and not state.reserved_requests else 0
            if quiet >= 2:
                report.counts = batch_counts(r, self.batch)
                break
        else:
            return
        self._done.set()
        print(f"medq worker --burst: {report.describe()}", file=sys.stderr, flush=True)
        log.info("burst: %s", report.describe())
        state.should_stop = report.exit_code  # the consumer's loop sees it and shuts the worker down warm
