"""Redis commands of many jobs, sent together: one pipeline per turn of the event loop.

The worker engine runs many jobs at once, and each job makes a few small Redis calls
(start, take and give back an endpoint slot, store the result, finish). Sent one by
one, each call is a socket write and read and a pooled connection: most of a job's
CPU in the worker, measured with ``medq bench``. Here a call is queued, and the
queue goes out as one pipeline once the loop has run everything else that was ready,
so 64 jobs in flight make a few round trips, not hundreds.

Scripts go as ``EVALSHA``; after a Redis restart (empty script cache) they are loaded
again and resent. Every batched step is a script, so each is atomic on its own.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import redis
import redis.asyncio

MAX_BATCH = 512
# One pipeline on the wire at a time: calls made meanwhile go in the next one (bigger
# batches), and calls reach Redis in the order they were made (EndpointGate.arelease
# relies on it).
MAX_CONCURRENT = 1


class Batcher:
    def __init__(self, r: redis.asyncio.Redis) -> None:
        self.r = r
        self._pending: list[tuple[tuple[Any, ...], str | None, asyncio.Future[Any]]] = []
        self._scheduled = False
        self._sending = 0
        self._scripts: dict[str, str] = {}  # sha -> source
        self._shas: dict[str, str] = {}  # source -> sha

    def script(self, source: str, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """Run a Lua script (by its SHA; loaded on first use or after a restart). Queued
        when called: calls reach Redis in the order they were made."""
        sha = self._shas.get(source)
        if sha is None:
            sha = self._shas[source] = hashlib.sha1(source.encode()).hexdigest()
            self._scripts[sha] = source
        return self._queue(("EVALSHA", sha, len(keys), *keys, *args), sha)

    def _queue(self, command: tuple[Any, ...], sha: str | None) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((command, sha, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        while self._pending and self._sending < MAX_CONCURRENT:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            self._sending += 1
            asyncio.get_running_loop().create_task(self._send(batch))

    async def _send(self, batch: list[tuple[tuple[Any, ...], str | None, asyncio.Future[Any]]]) -> None:
        try:
            pipe = self.r.pipeline(transaction=False)
            for command, _, _ in batch:
                pipe.execute_command(*command)
            try:
                replies = await pipe.execute(raise_on_error=False)
            except BaseException as exc:  # the connection: every call in the batch fails alike
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc if isinstance(exc, Exception) else redis.ConnectionError("cancelled"))
                if not isinstance(exc, Exception):
                    raise
                return
            for (command, sha, future), reply in zip(batch, replies, strict=True):
                if sha is not None and isinstance(reply, redis.exceptions.NoScriptError):
                    try:  # Redis lost its script cache (a restart): load it and run again
                        await self.r.script_load(self._scripts[sha])
                        reply = await self.r.execute_command(*command)
                    except Exception as exc:
                        reply = exc
                if future.done():
                    continue
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        finally:
            self._sending -= 1
            if self._pending and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
