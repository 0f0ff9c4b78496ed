"""Suspects run apart from healthy jobs, so that a record that kills workers is charged alone.

A job whose worker died while it ran (found ``running`` with a lapsed lease, or with lost
runs behind it) is a *suspect*: its record may be the one that kills workers, or it was a
companion of that record, or the worker was killed or cut off by somebody else. Nobody
can tell after one death. So (``medq.state.jobs`` START_LUA decides, ``JobField.RUN_MODE``
remembers how each run shared its process):

- the orphan sweep sends lost jobs back together, ``MEDQ_JOBS_PER_MESSAGE`` a message, and
  the suspects of a message of many run *among suspects only* (``Turn.COMPANY``), as does
  a suspect alone in its message that finds other suspects in its process: no healthy
  job shares their process, so a second death harms no healthy job, and it is not charged
  to anyone (nobody can pin it) but makes each of them run alone from then on. A worker
  killed with hundreds of jobs in flight gets them all back at full speed, not one at a
  time (issue 24: 89-99 s from the kill to the last job became 20-31 s). While suspects are
  in the process a job arriving *peeks* first (START_LUA starts no healthy job then), so a
  suspect joins the suspects running at once instead of waiting for their end. A suspect
  on its own runs alone at once;
- a suspect that died among suspects, or is one death from ``MEDQ_WORKER__MAX_LOST_RUNS``,
  runs *alone* (``Turn.ALONE``): it waits until nothing else runs, and nothing starts
  while it runs; a message of many sends it on as its own ``medq.extract`` (verdict
  ``alone``), so that its other jobs do not wait for that turn and another process may
  take it. Only deaths alone make a poison job, however the job comes back after them.

The price of running suspects together: a worker killed again while it runs them sends
every one of them to run alone, one at a time in a process. So a company holds no more
suspects than the process can have requests in flight (``company_max``): more would only
wait for an endpoint slot, exposed to that death; the others wait at the gate, not yet
started, and a death charges nothing to them.

A prefork child runs one message at a time anyway; the threads pool runs several
messages on one loop, and one death takes all of them. Jobs waiting at the gate have
not started (no lease, nothing charged): if a suspect kills the process, their messages
come back and they run as if nothing happened.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from enum import Enum


class Turn(Enum):
    NORMAL = "normal"  # a healthy job: beside any other healthy jobs
    COMPANY = "company"  # a suspect: beside other suspects only
    ALONE = "alone"  # nothing else in the process


class SuspectGate:
    """A three-way lock over a process's runs: healthy jobs share it with each other,
    suspects with each other (at most ``company_max`` at once; 0: no limit), and a lone
    suspect with nobody. Suspects go first (under steady load the process would never be
    free of healthy jobs), a lone suspect before the company. Use it on the engine's loop."""

    def __init__(self, company_max: int = 0) -> None:
        self.company_max = company_max
        self._changed = asyncio.Condition()
        self._running: Counter[Turn] = Counter()
        self._waiting: Counter[Turn] = Counter()

    def _may_start(self, turn: Turn) -> bool:
        running, waiting = self._running, self._waiting
        if turn is Turn.ALONE:
            return not +running
        if running[Turn.ALONE]:
            return False
        if turn is Turn.COMPANY:
            full = bool(self.company_max) and running[Turn.COMPANY] >= self.company_max
            return not running[Turn.NORMAL] and not waiting[Turn.ALONE] and not full
        return not running[Turn.COMPANY] and not waiting[Turn.ALONE] and not waiting[Turn.COMPANY]

    def suspects(self) -> int:
        """Suspects waiting or running in this process."""
        return sum(self._running[t] + self._waiting[t] for t in (Turn.COMPANY, Turn.ALONE))

    @asynccontextmanager
    async def turn(self, turn: Turn) -> AsyncIterator[None]:
        async with self._changed:
            self._waiting[turn] += 1
            try:
                await self._changed.wait_for(lambda: self._may_start(turn))
            finally:
                self._waiting[turn] -= 1
                self._changed.notify_all()  # a cancelled suspect no longer holds the others back
            self._running[turn] += 1
        try:
            yield
        finally:
            async with self._changed:
                self._running[turn] -= 1
                self._changed.notify_all()
