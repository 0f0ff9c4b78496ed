"""Several endpoints: one processor and one shared gate each; a job tries them in a
weighted random order, the cooling and the full ones last, and fails over.

    MEDQ_LLM__ENDPOINTS='http://gpu1:8000/v1*3,http://gpu2:8000/v1'     # weights 3 and 1
    MEDQ_LLM__ENDPOINTS='[{"url": "http://gpu1:11434/v1", "model": "llama3.1:8b"}]'
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from typing import Any

import redis

from medq.core.schemas import SchemaLoader
from medq.core.settings import Settings
from medq.core.urls import redact_url
from medq.state.endpoints import (
    EndpointGate,
    GateConfig,
    aendpoint_snapshots,
)
from worker.extract.processor import MedicalDataProcessor
from worker.llm.facts import learn_endpoint


@dataclass
class Endpoint:
    url: str
    weight: float
    processor: MedicalDataProcessor
    gate: EndpointGate


def _fitted(config: GateConfig, ep: Any, settings: Settings) -> tuple[GateConfig, int | None]:
    """What the server says of itself, asked once as the worker's engine starts: the gate
    fitted to it (no more requests in flight than it works on at once: its slots, from
    llama.cpp ``/props``), and its context window. A server that says nothing keeps the
    settings; the context is learned later from a refusal or a cut prompt."""
    llm = settings.llm
    facts = learn_endpoint(ep.url, (ep.api_key or llm.api_key).get_secret_value(), ep.model or llm.model)
    log = logging.getLogger("medq.worker")
    log.info("endpoint %s: %s", redact_url(ep.url), facts.describe())
    if facts.parallel and facts.parallel < config.max_in_flight:
        log.warning("endpoint %s works on %d requests at once: at most %d in flight, not MEDQ_LLM__MAX_IN_FLIGHT=%d",
                    redact_url(ep.url), facts.parallel, facts.parallel, config.max_in_flight)
        config = dataclasses.replace(
            config, max_in_flight=facts.parallel, min_in_flight=min(config.min_in_flight, facts.parallel)
        )
    # A server that says its slots is sent that many at once from the start; one that says
    # nothing starts at MEDQ_LLM__MIN_IN_FLIGHT and the cap grows while latency stays flat
    # (a slow start): many local servers work on one request at a time and say nothing.
    if facts.parallel:
        config = dataclasses.replace(config, start_in_flight=min(facts.parallel, config.max_in_flight))
    return config, facts.context_tokens


class EndpointPool:
    def __init__(
        self, endpoints: list[Endpoint], r: redis.Redis, rng: random.Random | None = None, batcher: Any = None
    ) -> None:
        if not endpoints:
            raise ValueError("no endpoints configured (MEDQ_LLM__BASE_URL or MEDQ_LLM__ENDPOINTS)")
        self.endpoints = endpoints
        self._r = r
        self._batcher = batcher
        self._rng = rng or random.Random()

    @classmethod
    def from_settings(
        cls, settings: Settings, r: redis.Redis, processor: MedicalDataProcessor | None = None, batcher: Any = None
    ) -> EndpointPool:
        """One endpoint per ``MEDQ_LLM__ENDPOINTS`` entry (or ``MEDQ_LLM__BASE_URL``).
        A given ``processor`` is used as the only endpoint (tests, embedding). With a
        :class:`~worker.pipeline.Batcher`, the gates also work on the worker engine's loop."""
        # One endpoint: a call waits its turn for an in-flight slot however long it takes
        # (the job's time limit bounds it); with several, a full one is left for the next.
        config = dataclasses.replace(
            GateConfig.from_settings(settings.llm),
            patient=processor is not None or len(settings.llm.all_endpoints) == 1,
        )
        if processor is not None:
            gate = EndpointGate(r, processor.base_url, config, batcher)
            processor.client.gate = processor.aclient.gate = gate
            return cls([Endpoint(processor.base_url, 1.0, processor, gate)], r, batcher=batcher)
        loader = SchemaLoader(settings.schema_dirs)
        out = []
        for ep in settings.llm.all_endpoints:
            fitted, learned_context = _fitted(config, ep, settings)
            gate = EndpointGate(r, ep.url, fitted, batcher)
            proc = MedicalDataProcessor.from_settings(settings, loader, endpoint=ep, gate=gate)
            proc.context_tokens = proc.context_tokens or learned_context  # a setting wins
            out.append(Endpoint(redact_url(ep.url), ep.weight, proc, gate))
        return cls(out, r, batcher=batcher)

    async def aclose(self) -> None:
        """Close each endpoint's HTTP clients and the gates' Redis client."""
        for e in self.endpoints:
            await e.processor.aclient.close()
            e.processor.client.close()
        self._r.close()

    @property
    def primary(self) -> Endpoint:
        return self.endpoints[0]

    async def aorder(self) -> list[Endpoint]:
        """The endpoints to try for one job, best first.

        Weighted random order (Efraimidis-Spirakis keys), so load spreads by weight;
        then, with more than one endpoint, those cooling down or at their in-flight cap
        go last (one pipelined read of their state). Only the worker engine orders
        endpoints, so only on its asyncio Redis client."""
        if len(self.endpoints) == 1:
            return list(self.endpoints)
        keyed = self._weighted()
        snaps = await aendpoint_snapshots(self._batcher.r, [e.url for e in keyed], keyed[0].gate.config.start)
        return self._busy_last(keyed, snaps)

    def _weighted(self) -> list[Endpoint]:
        return sorted(self.endpoints, key=lambda e: self._rng.random() ** (1.0 / e.weight), reverse=True)

    @staticmethod
    def _busy_last(keyed: list[Endpoint], snapshots: list[dict[str, Any]]) -> list[Endpoint]:
        snaps = {s["url"]: s for s in snapshots}

        def busy(e: Endpoint) -> int:
            s = snaps[e.url]
            if s["cooling_s"] > 0:
                return 2
            return 1 if s["in_flight"] >= int(s["limit"]) else 0

        return sorted(keyed, key=busy)  # stable: weighted order within each group
