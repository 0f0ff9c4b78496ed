"""medq's own metrics, for Prometheus: counted in each worker process, summed in Redis.

Counting in the process costs a dict update; the engine adds the counts to one Redis
hash (``medq:metrics``) every ``FLUSH_S`` seconds, in one round trip. ``medq metrics``
serves them, with gauges read at scrape time (queue length, endpoint slots), at
``/metrics``. Labels are schema names, endpoint URLs and kinds: never ids or text.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import redis

from medq.core.contract import KEY_PREFIX

log = logging.getLogger("medq.worker")  # the engine's flusher logs as the worker it runs in

METRICS_KEY = f"{KEY_PREFIX}:metrics"
RUNNING_KEY = f"{KEY_PREFIX}:metrics:running"  # worker process -> "jobs held, unix time"
FLUSH_S = 2.0
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def field(name: str, **labels: Any) -> str:
    """The hash field of one series: ``name|k=v|k=v`` (labels sorted)."""
    return "|".join([name, *(f"{k}={labels[k]}" for k in sorted(labels))])


def parse_field(f: str) -> tuple[str, dict[str, str]]:
    name, *pairs = f.split("|")
    return name, dict(p.split("=", 1) for p in pairs)


class Metrics:
    """Counts of this process since the last flush. Thread-safe."""

    def __init__(self) -> None:
        self._counts: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()
        self._keys: dict[tuple[Any, ...], Any] = {}  # series -> its field name(s), built once

    def incr(self, name: str, by: float = 1.0, **labels: Any) -> None:
        series = (name, *labels.items())
        key = self._keys.get(series)
        if key is None:
            key = self._keys[series] = field(name, **labels)
        with self._lock:
            self._counts[key] += by

    def observe(self, name: str, value: float, **labels: Any) -> None:
        """A histogram observation: the cumulative buckets, the sum and the count."""
        series = ("#hist", name, *labels.items())
        keys = self._keys.get(series)
        if keys is None:
            keys = self._keys[series] = (
                [field(f"{name}_bucket", le=le, **labels) for le in (*LATENCY_BUCKETS, "+Inf")],
                field(f"{name}_sum", **labels),
                field(f"{name}_count", **labels),
            )
        buckets, sum_key, count_key = keys
        first = next((i for i, le in enumerate(LATENCY_BUCKETS) if value <= le), len(LATENCY_BUCKETS))
        with self._lock:
            for key in buckets[first:]:
                self._counts[key] += 1
            self._counts[sum_key] += value
            self._counts[count_key] += 1

    def take(self) -> dict[str, float]:
        with self._lock:
            counts, self._counts = dict(self._counts), defaultdict(float)
        return counts

    def give_back(self, counts: dict[str, float]) -> None:
        """Counts a flush could not write (Redis away): kept for the next one."""
        with self._lock:
            for k, v in counts.items():
                self._counts[k] += v

    async def flush(self, r: Any, who: str, running: int) -> None:
        """Add the counts to Redis, and say how many jobs this process holds now."""
        counts = self.take()
        try:
            pipe = r.pipeline(transaction=False)
            for k, v in counts.items():
                pipe.hincrbyfloat(METRICS_KEY, k, v)
            pipe.hset(RUNNING_KEY, who, f"{running} {time.time():.0f}")
            await pipe.execute()
        except Exception:
            self.give_back(counts)
            raise


def live_workers(r: redis.Redis) -> int:
    """Worker processes seen in the last three metric flushes (``RUNNING_KEY``)."""
    held: dict[bytes, bytes] = r.hgetall(RUNNING_KEY)  # type: ignore[assignment]
    return len(worker_processes(held, time.time())[0])


def worker_processes(held: dict[bytes, bytes], now: float) -> tuple[list[int], list[bytes]]:
    """From ``RUNNING_KEY``: the jobs held by each worker process seen in the last three
    flushes, and the entries of processes gone for an hour (to delete)."""
    live, gone = [], []
    for who, value in held.items():
        n, at = value.decode().split()
        if now - float(at) <= 3 * FLUSH_S:
            live.append(int(n))
        elif now - float(at) > 3600:
            gone.append(who)
    return live, gone


metrics = Metrics()  # the process's counts; the engine flushes them


async def flush_forever(r: Any, who: str, running: Callable[[], int]) -> None:
    """Add this process's counts to the shared ones every ``FLUSH_S`` (``medq metrics``
    serves them), with ``running()`` jobs held now. Redis away: the counts wait for the
    next flush."""
    while True:
        await asyncio.sleep(FLUSH_S)
        try:
            await metrics.flush(r, who, running())
        except redis.RedisError as exc:
            log.warning("metrics flush: %s", type(exc).__name__)
