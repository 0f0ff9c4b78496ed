"""Ids for leases and runs."""

from __future__ import annotations

import itertools
import os
import uuid


class Ids:
    """Unique ids for leases and runs, cheaper than ``uuid4()`` per call: a random
    prefix per process (made again after a fork) and a counter."""

    def __init__(self) -> None:
        self._pid = -1
        self._prefix = ""
        self._count = itertools.count()

    def __call__(self) -> str:
        if self._pid != os.getpid():
            self._pid, self._prefix = os.getpid(), uuid.uuid4().hex[:16]
        return f"{self._prefix}{next(self._count):x}"


new_id = Ids()
