"""The fleet's schemas: which live workers have which schema versions loaded. The one owner
of the ``fleet_key`` sorted sets (``medq.core.contract``).

Each worker process says, every third of its word's life, the ``(name, version)`` pairs
its schema folders gave it (:func:`publish`, :func:`publish_forever`); its word runs out
``ttl_ms`` later (by Redis's clock, ``TIME``, the same for every host), so a worker killed
without a word drops out of the fleet within ``MEDQ_WORKER__LEASE_S``, as its jobs' leases
do. A worker that stops says so at once (:func:`withdraw`).

Readers: a worker that lacks a job's schema version asks :func:`live_versions` whether
another one has it (then it hands the job on, else the job fails as ``schema_unavailable``),
and ``medq requeue`` asks the same before it runs such dead letters again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

import redis
import redis.asyncio

from medq.core.contract import fleet_key

log = logging.getLogger("medq.worker")

# KEYS: the fleet key of each schema the worker has   ARGV[1] ttl_ms, ARGV[2] worker id,
# ARGV[2 + i]: the versions of KEYS[i], comma-separated.
# Drops the words that ran out, says this worker's again, and keeps each key at least as
# long as the newest word in it (so a fleet that stopped leaves no key behind).
PUBLISH_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  for v in string.gmatch(ARGV[2 + i], '[^,]+') do
    redis.call('ZADD', key, now + ttl, v .. ':' .. ARGV[2])
  end
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
return now
"""

# KEYS[1] the fleet key of one schema. Returns the members whose word has not run out.
LIVE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
"""

Held = list[tuple[str, int]]  # (schema name, version) pairs a worker has loaded


def _publish_args(worker_id: str, held: Held, ttl_ms: int) -> tuple[list[str], list[Any]]:
    versions: dict[str, list[int]] = {}
    for name, version in held:
        versions.setdefault(name, []).append(version)
    names = sorted(versions)
    return [fleet_key(n) for n in names], [ttl_ms, worker_id, *(",".join(map(str, versions[n])) for n in names)]


def _members(worker_id: str, held: Held) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, version in held:
        out.setdefault(fleet_key(name), []).append(f"{version}:{worker_id}")
    return out


def _versions(members: Iterable[Any]) -> Counter[int]:
    """Live workers per version, from ``<version>:<worker id>`` members."""
    c: Counter[int] = Counter()
    for m in members:
        text = m.decode() if isinstance(m, bytes) else str(m)
        version, _, _ = text.partition(":")
        if version.isdigit():
            c[int(version)] += 1
    return c


async def publish(r: redis.asyncio.Redis, worker_id: str, held: Held, ttl_ms: int) -> None:
    """Say that ``worker_id`` has the schema versions ``held``, for ``ttl_ms`` from now."""
    if not held:
        return
    keys, args = _publish_args(worker_id, held, ttl_ms)
    await r.register_script(PUBLISH_LUA)(keys=keys, args=args)


async def publish_forever(r: redis.asyncio.Redis, worker_id: str, held: Held, ttl_ms: int) -> None:
    """:func:`publish` every third of ``ttl_ms`` until cancelled; a Redis away is logged
    and tried again (the word runs out meanwhile, as a dead worker's would)."""
    period_s = max(ttl_ms / 3000, 0.05)
    while True:
        try:
            await publish(r, worker_id, held, ttl_ms)
        except redis.RedisError as exc:
            log.warning("cannot say this worker's schemas to the fleet (%s); trying again", type(exc).__name__)
        await asyncio.sleep(period_s)


async def withdraw(r: redis.asyncio.Redis, worker_id: str, held: Held) -> None:
    """``worker_id`` stops: it has none of ``held`` any more, from now."""
    members = _members(worker_id, held)
    if not members:
        return
    pipe = r.pipeline(transaction=False)
    for key, ms in members.items():
        pipe.zrem(key, *ms)
    await pipe.execute()


async def live_versions(r: redis.asyncio.Redis, schema: str) -> Counter[int]:
    """The versions of ``schema`` live workers have loaded, each with how many workers."""
    return _versions(await r.register_script(LIVE_LUA)(keys=[fleet_key(schema)]))


def live_versions_sync(r: redis.Redis, schema: str) -> Counter[int]:
    """:func:`live_versions` for a caller without an event loop (``medq requeue``)."""
    return _versions(r.register_script(LIVE_LUA)(keys=[fleet_key(schema)]))
