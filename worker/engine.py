"""The worker process's engine: one asyncio loop in a thread of its own, made once per process.

Celery's pool threads hand it jobs and wait for the outcome, so a process keeps as many
requests in flight as the endpoints allow, not one per pool thread, and every job shares
one Redis client and one HTTP pool. The Celery app is passed in (for the orphan sweep's
messages): this module does not import ``worker.celery_app``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any

import redis

from medq.core.settings import Settings, get_settings
from medq.state import fleet, jobs
from medq.state.dispatch import TaskSender, send_jobs
from worker.leases import OrphanSweep, orphan_grace_s, sweep_period_s
from worker.runner import JobRunner, Outcome, RetryLater

log = logging.getLogger("medq.worker")


class Engine:
    """The loop, its :class:`JobRunner`, the sweep for jobs whose message was lost, and this
    process's word to the fleet: the schema versions it has (``medq.state.fleet``)."""

    def __init__(self, settings: Settings, app: TaskSender) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="medq-engine", daemon=True)
        self._thread.start()
        self.runner: JobRunner = self.call(self._make_runner(settings))
        # Lost jobs together, MEDQ_JOBS_PER_MESSAGE a message: a worker killed with many jobs
        # in flight gets them back side by side, among suspects only (worker.isolation), not
        # one message and one turn each (the tail after a kill -9 was 95 s for 13 s of work).
        # A job sent again that has not started a lease later (its copy lost once more, taken
        # by a worker that died too, or stuck behind a long queue) is sent once more, then
        # after twice as long, up to the visibility timeout.
        per_message = settings.jobs_per_message
        self.orphans = OrphanSweep(self.runner.r, orphan_grace_s(settings),
                                   lambda ids: send_jobs(app, ids, per_message=per_message),
                                   period_s=sweep_period_s(settings), hold_min_s=settings.worker.lease_s,
                                   hold_max_s=settings.visibility_timeout_s)
        self._sweeper = asyncio.run_coroutine_threadsafe(self.orphans.forever(), self.loop)
        # Said once before the first job, so a worker that lacks a schema version sees this one
        # from the moment it takes messages; then again until it stops (its word runs out a
        # lease after, if it dies without a word).
        self._held = self.runner.processor.schema_loader.pairs()
        self._fleet_ttl_ms = int(settings.worker.lease_s * 1000)
        try:
            self.call(fleet.publish(self.runner.r, self.runner.worker_id, self._held, self._fleet_ttl_ms))
        except redis.RedisError:
            pass  # Redis away at start: the publisher below says it, and says the schemas once it is back
        self._publisher = asyncio.run_coroutine_threadsafe(
            fleet.publish_forever(self.runner.r, self.runner.worker_id, self._held, self._fleet_ttl_ms), self.loop)

    @staticmethod
    async def _make_runner(settings: Settings) -> JobRunner:
        runner = JobRunner(settings)
        # From the start, not at the first job: an idle worker is seen too (``medq api``'s /healthz).
        runner.keep_flushing_metrics()
        return runner

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` on the engine's loop and wait for its result (from another thread)."""
        future: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result()

    def run(self, job_id: str) -> Outcome | RetryLater:
        result: Outcome | RetryLater = self.call(self.runner.run(job_id))
        return result

    def run_many(self, job_ids: list[str]) -> list[Outcome | RetryLater | BaseException]:
        result: list[Outcome | RetryLater | BaseException] = self.call(self.runner.run_many(job_ids))
        return result

    def reserve(self, job_ids: list[str]) -> None:
        """A message of these jobs reached this process (from any thread): they are heard of
        until :meth:`unreserve`, waiting for a pool thread or their countdown included."""
        self.loop.call_soon_threadsafe(self.runner.leases.reserve, list(job_ids))

    def unreserve(self, job_ids: list[str]) -> None:
        self.loop.call_soon_threadsafe(self.runner.leases.unreserve, list(job_ids))

    def stop_taking(self) -> None:
        """The worker is stopping (from any thread): jobs still in line for a model call go
        back to the broker now, uncharged, instead of holding the shutdown up; calls under
        way finish."""
        self.loop.call_soon_threadsafe(self.runner.stopping.set)

    def sent_back(self, job_ids: list[str], countdown_s: float) -> None:
        """These jobs' retries go to the broker now (from any thread): this process holds them
        no more, and a message waiting in the broker's queue behind busy workers is not lost:
        they are watched until the countdown's end plus the broker's visibility timeout."""
        self.call(self._sent_back(list(job_ids), countdown_s))

    async def _sent_back(self, job_ids: list[str], countdown_s: float) -> None:
        self.runner.leases.forget(job_ids)
        await jobs.watch_queued(self.runner.r, job_ids,
                                int((countdown_s + self.runner.settings.visibility_timeout_s) * 1000))

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the sweep, close the runner's connections, stop the loop and its thread.
        A worker process never needs this (its engine ends with it); an engine made in a
        process that goes on (``worker.burst``, tests) does."""
        if not self.loop.is_running():
            return
        self._sweeper.cancel()
        self._publisher.cancel()
        try:
            self.call(self._aclose())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout_s)
            if not self._thread.is_alive():
                self.loop.close()

    async def _aclose(self) -> None:
        try:  # jobs of its schemas go to the workers that stay, or fail saying so, from now
            await fleet.withdraw(self.runner.r, self.runner.worker_id, self._held)
        except redis.RedisError as exc:
            log.warning("cannot withdraw this worker's schemas from the fleet (%s); they run out in %.0fs",
                        type(exc).__name__, self._fleet_ttl_ms / 1000)
        await self.runner.aclose()
        # What is still scheduled (a cancelled sweep, a heartbeat) ends before the loop stops.
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


_engine: Engine | None = None
_engine_pid: int | None = None
_lock = threading.Lock()


def running_engine() -> Engine | None:
    """This process's engine if it has made one (a prefork pool's parent never does)."""
    return _engine if _engine is not None and _engine_pid == os.getpid() else None


def get_engine(app: TaskSender) -> Engine:
    """The process's engine: made once per process (a forked child makes its own), sending
    through ``app``."""
    global _engine, _engine_pid
    if _engine is None or _engine_pid != os.getpid():
        with _lock:
            if _engine is None or _engine_pid != os.getpid():
                _engine = Engine(get_settings(), app)
                _engine_pid = os.getpid()
    return _engine
