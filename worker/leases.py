"""Leases and lost messages: how a job run by one worker stays its own, and how a job
whose message was lost runs again.

- A run holds a *lease* on its job (``lease_until``), renewed here by one heartbeat for
  all the jobs of the process, every third of a lease. A second delivery of a job whose
  lease is live does not run it (``medq.state.jobs.START_LUA``).
- A started job is touched again within its lease, its countdown (a retry) or the
  visibility timeout (a message of a killed worker comes back). One untouched for longer
  has lost its message: the orphan sweep sends it again (never silently dropped).
"""

from __future__ import annotations

import asyncio
import logging
import random
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
        self._heartbeat: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, job_id: str, run_id: str) -> None:
        """Keep ``run_id``'s lease on ``job_id`` alive until :meth:`release`."""
        self._held[job_id] = run_id
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    def release(self, job_id: str) -> None:
        self._held.pop(job_id, None)

    async def _beat(self) -> None:
        """Renew the held leases, every third of a lease."""
        period_s = self.lease_ms / 3000
        while True:
            await asyncio.sleep(period_s)
            held = list(self._held.items())
            if not held:
                continue
            try:
                await jobs.renew(self.r, held, self.lease_ms)
            except redis.RedisError as exc:
                log.warning("lease heartbeat: %s", type(exc).__name__)


def orphan_grace_s(settings: Settings) -> float:
    """How long a started job may go untouched before its message counts as lost: its
    lease, its longest countdown, the visibility timeout, and a margin."""
    return settings.visibility_timeout_s + settings.max_countdown_s + settings.worker.lease_s + 5


class OrphanSweep:
    """Sends again the started jobs whose message is gone. A second message for a job is
    harmless: the lease and the final state keep it from running twice."""

    def __init__(self, r: redis.asyncio.Redis, grace_s: float, resend: Callable[[list[str]], None]) -> None:
        self.r = r
        self.grace_s = grace_s
        self._resend = resend  # blocking (a broker write): run in a thread

    async def sweep(self) -> int:
        """One round; returns how many jobs were sent again."""
        live = await jobs.claim_orphans(self.r, int(self.grace_s * 1000), _CLAIM_LIMIT)
        if not live:
            return 0
        await asyncio.to_thread(self._resend, live)
        metrics.incr("medq_orphans_resent_total", len(live))
        log.warning("%d started job(s) untouched for %.0fs (message lost with a worker?); sent again: %s",
                    len(live), self.grace_s, ", ".join(live[:10]))
        return len(live)

    async def forever(self) -> None:
        period_s = min(60.0, max(1.0, self.grace_s / 4))
        while True:
            await asyncio.sleep(period_s * (0.5 + random.random()))  # workers spread out
            try:
                await self.sweep()
            except redis.RedisError as exc:
                log.warning("orphan sweep: %s", type(exc).__name__)
