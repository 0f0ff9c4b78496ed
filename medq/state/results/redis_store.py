"""Results in Redis: one JSON string per job, expiring after ``MEDQ_RESULTS_TTL_S``."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
import redis.asyncio

from medq.core.contract import job_key, result_key
from medq.core.crypto import Sealer, open_doc, seal_doc
from medq.core.errors import StoreUnavailable
from medq.state.connect import connect
from medq.state.jobs import ScriptCalls

_CHUNK = 500


@contextmanager
def reachable() -> Iterator[None]:
    """Translate "Redis is away" (refused, reset, timed out, loading) into
    :class:`StoreUnavailable`: back-pressure, said by type name only."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailable(f"Redis results store unreachable ({type(exc).__name__})") from None

# One round trip, atomic: a stored success is never replaced (first success wins).
# KEYS[1] result, KEYS[2] (optional) the job hash: no result for a job purged while it
# ran (gone from the job states; see medq.state.jobs.FINISH_LUA)   ARGV[1] value, ARGV[2] ttl_s
PUT_LUA = """
if KEYS[2] then
  local live = redis.call('HMGET', KEYS[2], 'status', 'batch')
  if not live[1] or not live[2] then return 0 end
end
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, doc = pcall(cjson.decode, cur)
  if ok and type(doc) == 'table' and doc['status'] == 'succeeded' then return 0 end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
"""


class RedisResultStore:
    def __init__(
        self, url: str, ttl_s: int | None = None, sealer: Sealer | None = None, beside_jobs: bool = False,
    ) -> None:
        self._url = url
        self.sealer = sealer
        self.beside_jobs = beside_jobs  # in the job states' Redis: written through the worker's pipelines
        self._r = connect(url)
        self.ttl_s = ttl_s
        self._put = self._r.register_script(PUT_LUA)
        self._aput: Any = None  # on an asyncio client, made by the first aput

    def encode(self, doc: dict[str, Any]) -> str:
        """The stored value: the document, sealed when a key is set."""
        return json.dumps(seal_doc(doc, self.sealer), ensure_ascii=False)

    def put(self, doc: dict[str, Any]) -> bool:
        value = self.encode(doc)
        with reachable():
            return bool(self._put(keys=[result_key(doc["job_id"])], args=[value, self.ttl_s or 0]))

    async def aput(self, doc: dict[str, Any], calls: ScriptCalls | None = None) -> bool:
        """:meth:`put` on the running asyncio loop (the worker engine's). Beside the job
        states, through ``calls`` (their pipelines), with the job key: no result for a job
        purged while it ran."""
        value = self.encode(doc)  # sealed with this store's key
        if self.beside_jobs and calls is not None:
            keys = [result_key(doc["job_id"]), job_key(doc["job_id"])]
            with reachable():
                return bool(await calls.script(PUT_LUA, keys, [value, self.ttl_s or 0]))
        if self._aput is None:
            self._aput = connect(self._url, asyncio=True).register_script(PUT_LUA)
        with reachable():
            return bool(await self._aput(keys=[result_key(doc["job_id"])], args=[value, self.ttl_s or 0]))

    def delete(self, job_ids: Iterable[str]) -> int:
        ids = list(job_ids)
        return sum(int(self._r.delete(*[result_key(j) for j in ids[i : i + _CHUNK]])) for i in range(0, len(ids), _CHUNK))

    def delete_batch(self, batch: str) -> int:
        return 0  # keys are found by job id only: medq purge deletes them with the job states

    def get(self, job_id: str) -> dict[str, Any] | None:
        with reachable():
            raw = self._r.get(result_key(job_id))
        return open_doc(json.loads(raw), self.sealer) if raw else None

    def get_many(self, job_ids: Iterable[str]) -> Iterator[dict[str, Any]]:
        ids = list(job_ids)
        for i in range(0, len(ids), _CHUNK):
            with reachable():
                raws = self._r.mget([result_key(j) for j in ids[i : i + _CHUNK]])
            for raw in raws:
                if raw:
                    yield open_doc(json.loads(raw), self.sealer)

    def close(self) -> None:
        self._r.close()
