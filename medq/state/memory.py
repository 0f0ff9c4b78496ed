"""Redis at its ``maxmemory``: say so plainly, and wait for room.

With ``maxmemory-policy noeviction`` (the right policy for a queue: an evicting Redis
drops jobs, notes and results without a word) a full Redis refuses every write with
``OutOfMemoryError`` (a ``ResponseError``, not a connection error) and still serves
reads and deletes. Nothing is lost by waiting: workers hold their messages and try
again; ``medq enqueue`` stops and a re-run sends the rest.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from medq.core.contract import KEY_PREFIX


def probe_write(r: redis.Redis) -> None:
    """One tiny write that expires by itself: raises ``OutOfMemoryError`` while Redis is full."""
    r.set(f"{KEY_PREFIX}:write-probe", 1, px=1000)


log = logging.getLogger("medq.worker")

WAIT_MAX_S = 30.0  # the longest pause between two tries while Redis is full
HINT = "free memory or raise maxmemory (README: Sizing Redis)"


def is_full(exc: BaseException) -> bool:
    """``exc`` is Redis refusing a write for want of memory, raised as it is or wrapped
    (kombu re-raises it as its own ``OperationalError`` when a message is sent)."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, redis.exceptions.OutOfMemoryError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def full_message(client: Any) -> str:
    """``Redis is full (maxmemory 1.00M, used 1.02M, policy noeviction)``, from INFO
    (read-only, so it works while Redis refuses writes)."""
    try:
        info = client.info("memory")
    except (redis.RedisError, OSError):
        return "Redis is full (used memory is at maxmemory)"
    return (
        f"Redis is full (maxmemory {info.get('maxmemory_human', '?')}, used {info.get('used_memory_human', '?')}, "
        f"policy {info.get('maxmemory_policy', '?')})"
    )


def backoff_s(attempt: int) -> float:
    """1, 2, 4 ... seconds, at most WAIT_MAX_S."""
    return min(2.0 ** min(attempt, 10), WAIT_MAX_S)


def wait_for_room(client: Any, what: str, attempt: int) -> None:
    """Log that ``what`` ("3 job(s) wait") and why (with the server's numbers), then sleep."""
    delay_s = backoff_s(attempt)
    log.warning("%s: %s; trying again in %.0fs; %s", full_message(client), what, delay_s, HINT)
    time.sleep(delay_s)
