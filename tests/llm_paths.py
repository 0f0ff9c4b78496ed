"""The two ways medq calls a model, for tests that must hold on both.

``sync``: the blocking path (``MedicalDataProcessor.process``, ``LLMClient``, the gate's
``call``), which users, ``medq endpoints`` and ``medq bench`` take; ``async``: the path
the worker engine runs (``aprocess``, ``AsyncLLMClient``, the gate's ``acall`` through
the engine's batched Redis). Each test here is run once per path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis
import redis.asyncio

from medq.core.schemas import ExtractionSchema
from medq.state.endpoints import EndpointGate, GateConfig, Lease
from worker.extract.processor import Extraction, MedicalDataProcessor
from worker.llm.client import AsyncLLMClient, Completion, LLMClient
from worker.pipeline import Batcher

PATHS = ("sync", "async")
T = TypeVar("T")


def complete(path: str, base_url: str, messages: list[dict[str, str]], model: str = "m", **kw: Any) -> Completion:
    """One call of a fresh client of ``path``, closed afterwards."""
    kw = {"response_format": None, "max_tokens": 1, "temperature": 0.0, **kw}
    if path == "sync":
        client = LLMClient(base_url, "sk-test", model)
        try:
            return client.complete(messages, **kw)
        finally:
            client.close()

    async def engine_call() -> Completion:
        aclient = AsyncLLMClient(base_url, "sk-test", model)
        try:
            return await aclient.complete(messages, **kw)
        finally:
            await aclient.close()

    return asyncio.run(engine_call())


class Driven:
    """A processor whose ``process`` takes ``path``; everything else is the processor's."""

    def __init__(self, processor: MedicalDataProcessor, path: str) -> None:
        self.processor = processor
        self.path = path

    def process(self, text: str, schema: str | ExtractionSchema, record_id: str = "?") -> Extraction:
        if self.path == "sync":
            return self.processor.process(text, schema, record_id)

        async def engine_call() -> Extraction:
            try:
                return await self.processor.aprocess(text, schema, record_id)
            finally:
                await self.processor.aclient.close()  # its session belongs to this loop

        return asyncio.run(engine_call())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.processor, name)


class DrivenGate:
    """The gate's calls as blocking ones, on ``path``. On ``async`` each lease is taken
    by a gate of its own, as if by another worker process: the rules tested are the
    shared ones (Redis), and one gate's process-local queue would make a test that
    holds leases on purpose wait for itself instead of meeting the shared cap."""

    def __init__(self, r: redis.Redis, url: str, config: GateConfig, path: str) -> None:
        self.path = path
        self._made = (r, url, config)
        self.gate = EndpointGate(r, url, config)
        if path == "async":
            self._loop = asyncio.new_event_loop()
            self._ar = redis.asyncio.Redis(connection_pool=redis.asyncio.ConnectionPool(**_kwargs(r)))
            self._batcher = Batcher(self._ar)
            self._held: dict[str, EndpointGate] = {}

    def _run(self, coro: Awaitable[T]) -> T:
        return self._loop.run_until_complete(coro)  # type: ignore[arg-type]

    def _fresh(self) -> EndpointGate:
        r, url, config = self._made
        return EndpointGate(r, url, config, self._batcher)

    def acquire(self, est_tokens: int, lease_s: float | None = None) -> Lease:
        if self.path == "sync":
            return self.gate.acquire(est_tokens, lease_s)
        gate = self._fresh()
        lease = self._run(gate.aacquire(est_tokens, lease_s))
        self._held[lease.lease_id] = gate
        return lease

    def release(self, lease: Lease, outcome: str, used_tokens: int | None = None, latency: float = 0.0) -> None:
        if self.path == "sync":
            return self.gate.release(lease, outcome, used_tokens, latency)
        self._run(self._held.pop(lease.lease_id).arelease(lease, outcome, used_tokens, latency))

    def call(self, est_tokens: int, fn: Callable[[], Any], lease_s: float | None = None) -> Any:
        if self.path == "sync":
            return self.gate.call(est_tokens, fn, lease_s)

        async def afn() -> Any:
            return fn()

        return self._run(self._fresh().acall(est_tokens, afn, lease_s))

    def snapshot(self) -> dict[str, Any]:
        return self.gate.snapshot()

    def close(self) -> None:
        if self.path == "async":
            self._run(self._ar.aclose())
            self._loop.close()


def _kwargs(r: redis.Redis) -> dict[str, Any]:
    """The connection settings of a blocking client, for an asyncio one to the same database."""
    kw = r.connection_pool.connection_kwargs
    return {k: kw[k] for k in ("host", "port", "db", "password", "username") if k in kw}
