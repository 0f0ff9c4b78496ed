"""Leases and lost messages: how a job run by one worker stays its own, and how a job
whose message was lost runs again.

- A run holds a *lease* on its job (``lease_until``), renewed here by one heartbeat for
  all the jobs of the process, every third of a lease. A second delivery of a job whose
  lease is live does not run it (``medq.state.jobs.START_LUA``).
- The watch (``WATCH_KEY``) holds each started, unfinished job with the time it should
  next be heard of: a running job its lease's end (renewed by the heartbeat), a job put
  back its retry's due time (the countdown: not a dead worker). A job whose message a
  live worker holds without running it yet (a countdown due, a message waiting for a
  pool thread, a job waiting for its turn at the process's gate) is *reserved*: the same
  heartbeat keeps it heard of. One not heard of for a grace after that has lost its
  worker or its message: the orphan sweep of any live
  worker sends it again, within about lease + grace + a sweep period of the last
  heartbeat, not after the broker's visibility timeout (Redis: half an hour by default).
  The old message, if it ever comes back, finds the job leased or finished and does
  nothing; a stale run of a worker that was only cut off writes nothing (``FENCE``).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Callable

import redis
import redis.asyncio

from medq.core.settings import Settings
from medq.state import jobs
from medq.state.metrics import metrics

log = logging.getLogger("medq.worker")

# The sweep reads this many claimed jobs per round.
_CLAIM_LIMIT = 500


class Leases:
    """The leases of the jobs this process runs (job id -> run id), one heartbeat for all.
    Make it, and call it, inside the engine's loop."""

    def __init__(self, r: redis.asyncio.Redis, lease_ms: int) -> None:
        self.r = r
        self.lease_ms = lease_ms
        self._held: dict[str, str] = {}
        self._reserved: Counter[str] = Counter()  # job id -> messages of this process holding it
        self._heartbeat: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, job_id: str, run_id: str) -> None:
        """Keep ``run_id``'s lease on ``job_id`` alive until :meth:`release`."""
        self._held[job_id] = run_id
        self._beating()

    def release(self, job_id: str) -> None:
        self._held.pop(job_id, None)

    def reserve(self, job_ids: list[str]) -> None:
        """This process holds these jobs' message and will run them: keep them heard of
        (at once, and with every heartbeat) until :meth:`unreserve`."""
        fresh = [j for j in job_ids if not self._reserved[j]]
        self._reserved.update(job_ids)
        self._beating()
        if fresh:
            loop = asyncio.get_running_loop()
            loop.create_task(self._heard_of(fresh))

    def unreserve(self, job_ids: list[str]) -> None:
        for j in job_ids:
            if j in self._reserved:
                self._reserved[j] -= 1
                if self._reserved[j] <= 0:
                    del self._reserved[j]

    def forget(self, job_ids: list[str]) -> None:
        """These jobs' retries are in the broker: this process holds them no more."""
        for j in job_ids:
            self._reserved.pop(j, None)

    def _beating(self) -> None:
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def _heard_of(self, job_ids: list[str]) -> None:
        try:
            await jobs.keep_heard_of(self.r, job_ids, self.lease_ms)
        except redis.RedisError as exc:
            log.warning("lease heartbeat: %s", type(exc).__name__)

    async def aclose(self) -> None:
        """Stop the heartbeat (the engine is closing)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()

    async def _beat(self) -> None:
        """Renew the held leases, and keep the reserved jobs heard of, every third of a lease."""
        period_s = self.lease_ms / 3000
        while True:
            await asyncio.sleep(period_s)
            held = list(self._held.items())
            waiting = [j for j in self._reserved if j not in self._held]
            try:
                if held:
                    await jobs.renew(self.r, held, self.lease_ms)
                if waiting:
                    await jobs.keep_heard_of(self.r, waiting, self.lease_ms)
            except redis.RedisError as exc:
                log.warning("lease heartbeat: %s", type(exc).__name__)


def orphan_grace_s(settings: Settings) -> float:
    """How long past its lease's end (or its retry's due time) a started job may go unheard
    of before it counts as lost: a third of a lease, at least 2 s. A live worker renews a
    lease every third of one, so that is one missed heartbeat more; a due retry waiting
    for a free pool thread starts well within it."""
    return max(2.0, settings.worker.lease_s / 3)


def sweep_period_s(settings: Settings) -> float:
    """How often each worker process sweeps (spread out at random around it)."""
    return min(10.0, max(1.0, settings.worker.lease_s / 6))


class OrphanSweep:
    """Sends again the started jobs whose message is gone. A second message for a job is
    harmless: the lease and the final state keep it from running twice."""

    def __init__(self, r: redis.asyncio.Redis, grace_s: float, resend: Callable[[list[str]], None], *,
                 period_s: float = 10.0, hold_min_s: float = 30.0, hold_max_s: float = 600.0) -> None:
        self.r = r
        self.grace_s = grace_s
        self.period_s = period_s
        # a job sent again is sent once more if it has not started by then: first after
        # hold_min_s, then twice as long each time, up to hold_max_s
        self.hold_min_s = hold_min_s
        self.hold_max_s = hold_max_s
        self._resend = resend  # blocking (a broker write): run in a thread

    async def sweep(self) -> int:
        """One round; returns how many jobs were sent again."""
        live = await jobs.claim_orphans(self.r, int(self.grace_s * 1000), int(self.hold_min_s * 1000),
                                        int(self.hold_max_s * 1000), _CLAIM_LIMIT)
        if not live:
            return 0
        await asyncio.to_thread(self._resend, live)
        metrics.incr("medq_orphans_resent_total", len(live))
        log.warning("%d started job(s) unheard of for %.0fs past their lease or retry (a worker dead or cut off?); "
                    "sent again: %s", len(live), self.grace_s, ", ".join(live[:10]))
        return len(live)

    async def forever(self) -> None:
        while True:
            await asyncio.sleep(self.period_s * (0.5 + random.random()))  # workers spread out
            try:
                await self.sweep()
            except redis.RedisError as exc:
                log.warning("orphan sweep: %s", type(exc).__name__)
