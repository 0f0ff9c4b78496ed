"""Suspects run alone in their process, so that a record that kills workers is charged alone.

A job whose worker died while it ran (``lost`` > 0, or found ``running``) is a *suspect*:
its record may be the one that kills workers, or it was a companion of that record.
Nobody can tell after one death. If the suspect ran beside other jobs and the process
died again, they would all be charged a lost run again, and innocent jobs would reach
``MEDQ_WORKER__MAX_LOST_RUNS`` because of another record. So:

- a message of many jobs does not run its suspects: it sends each on as its own
  ``medq.extract`` message (``medq.state.jobs`` START_LUA, verdict ``alone``);
- in a process, a suspect waits until no other job runs, and no job starts while it
  waits or runs (this gate). A prefork child runs one message at a time anyway; the
  threads pool runs several messages on one loop, and one death takes all of them.

Jobs waiting at the gate have not started (no lease, nothing charged): if the suspect
kills the process, their messages come back and they run as if nothing happened.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class SuspectGate:
    """A writer-first lock over a process's runs: a suspect is the writer. Use it on the
    engine's loop."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._running = 0  # runs in progress, suspects included
        self._suspects_waiting = 0
        self._suspect_running = False

    @asynccontextmanager
    async def turn(self, alone: bool) -> AsyncIterator[None]:
        async with self._changed:
            if alone:
                self._suspects_waiting += 1
                try:
                    await self._changed.wait_for(lambda: self._running == 0)
                finally:
                    self._suspects_waiting -= 1
                    self._changed.notify_all()  # a cancelled suspect no longer holds the others back
                self._suspect_running = True
            else:
                # Suspects go first: under steady load the process would never be empty.
                await self._changed.wait_for(lambda: not self._suspects_waiting and not self._suspect_running)
            self._running += 1
        try:
            yield
        finally:
            async with self._changed:
                self._running -= 1
                if alone:
                    self._suspect_running = False
                self._changed.notify_all()
