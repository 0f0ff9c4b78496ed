"""Results in Redis: one JSON string per job, expiring after ``MEDQ_RESULTS_TTL_S``."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import redis

from medq.contract import result_key

_CHUNK = 500


class RedisResultStore:
    def __init__(self, url: str, ttl_s: int | None = None) -> None:
        self._r = redis.Redis.from_url(url)
        self.ttl_s = ttl_s

    def put(self, doc: dict[str, Any]) -> bool:
        key = result_key(doc["job_id"])
        value = json.dumps(doc, ensure_ascii=False)
        with self._r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)  # optimistic: another run writing meanwhile aborts ours
                    current = pipe.get(key)
                    if current and json.loads(current).get("status") == "succeeded":
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    pipe.set(key, value, ex=self.ttl_s)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self._r.get(result_key(job_id))
        return json.loads(raw) if raw else None

    def get_many(self, job_ids: Iterable[str]) -> Iterator[dict[str, Any]]:
        ids = list(job_ids)
        for i in range(0, len(ids), _CHUNK):
            for raw in self._r.mget([result_key(j) for j in ids[i : i + _CHUNK]]):
                if raw:
                    yield json.loads(raw)

    def close(self) -> None:
        self._r.close()
