"""Uploads still arriving (``upload_key``): the one owner of their reads and writes.

``medq api``'s ``POST /v1/batches`` parks each checked record here as it is read, so
memory holds ids, not notes; at commit, CREATE_JOB_LUA (``medq.state.jobs``) reads each
payload from this hash by its field (the record's position), and the hash goes.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import redis

from medq.core.contract import upload_key

STAGE_TTL_S = 3600  # an upload that never commits (the service died) leaves nothing for long


class StagedUpload:
    """One upload's hash of parked payloads (field: position in the upload, as a string)."""

    def __init__(self, r: redis.Redis, upload_id: str | None = None) -> None:
        self.r = r
        # a random id: two uploads at once never share a hash
        self.key = upload_key(upload_id or uuid.uuid4().hex)

    def park(self, payloads: Mapping[str, str]) -> None:
        """Add ``payloads`` in one round trip; each write pushes the expiry back, so only an
        upload that stops arriving for STAGE_TTL_S expires."""
        if not payloads:
            return
        fields: dict[Any, Any] = dict(payloads)  # redis-py's stubs take no Mapping[str, str]
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(self.key, mapping=fields)
        pipe.expire(self.key, STAGE_TTL_S)
        pipe.execute()

    def discard(self) -> None:
        """Delete the parked payloads (committed as jobs, or given up)."""
        self.r.delete(self.key)
