"""Streamed answers, timed by progress (the worker engine's client): a slow server that
keeps producing is never cut off, a hung one is given up after ``MEDQ_LLM__TIMEOUT_S`` of
silence, and what an endpoint refused (streaming, a response_format, a second request
beside a stream) is learned once, for every worker, in the endpoint's state."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from medq.core.errors import EndpointTimeout
from medq.state.endpoints import EndpointGate, GateConfig, endpoint_keys, endpoint_snapshot
from tests.helpers import enqueue_wait, records, run_cli
from worker.llm.client import AsyncLLMClient, Completion
from worker.pipeline import Batcher

NOTE = [{"role": "user", "content": "72-year-old man, former smoker. Metformin 500 mg twice daily."}]
FORMAT = {"type": "json_object", "schema": {"type": "object", "properties": {"smoking": {"type": "string"}}}}


def _stats(base: str) -> dict:
    return httpx.get(base.removesuffix("/v1") + "/stats").json()


def _script(base: str, *outcomes: str) -> None:
    httpx.post(base.removesuffix("/v1") + "/sim/script", json={"outcomes": list(outcomes)}).raise_for_status()


def test_a_hung_server_is_given_up_after_the_silence_limit_while_a_slow_answer_streams_on(
    simulator: Callable[..., str],
) -> None:
    base = simulator("--latency-ms", "3000")  # a whole answer takes 3 s, a chunk every ~0.1 s
    _script(base, "timeout", "ok")  # the first request hangs: accepted, never a token
    finished: dict[str, float] = {}

    async def ask(name: str, client: AsyncLLMClient) -> Completion | BaseException:
        try:
            return await client.complete(NOTE, response_format=FORMAT, max_tokens=64, temperature=0.0)
        except EndpointTimeout as exc:
            return exc
        finally:
            finished[name] = time.monotonic()

    async def both() -> list[Completion | BaseException]:
        client = AsyncLLMClient(base, "unused", "m", timeout_s=1.0)  # MEDQ_LLM__TIMEOUT_S=1
        try:
            hung = asyncio.ensure_future(ask("hung", client))
            await asyncio.sleep(0.1)
            return [await hung, await ask("slow", client)]
        finally:
            await client.close()

    started = time.monotonic()
    hung, slow = asyncio.run(both())
    assert isinstance(hung, EndpointTimeout)  # 1 s of silence
    assert isinstance(slow, Completion) and slow.finish_reason == "stop" and '"smoking"' in slow.content
    # the slow one ran three times the silence limit and was not cut off; the hung one was
    # given up while the slow one still streamed
    assert slow.latency_ms > 2000 and finished["hung"] < finished["slow"]
    assert finished["hung"] - started < slow.latency_ms / 1000
    assert slow.completion_tokens > 0  # usage, from the stream's last chunk


def test_a_server_that_refuses_streams_is_asked_plainly_and_every_worker_learns_it_once(
    r: redis.Redis, redis_url: str, simulator: Callable[..., str],
) -> None:
    base = simulator("--no-stream")
    r.delete(*endpoint_keys(base))

    async def calls(n: int) -> list[Completion]:
        import redis.asyncio

        ar = redis.asyncio.Redis.from_url(redis_url)
        out = []
        try:
            for _ in range(n):  # each call as a worker of its own: a gate and a client each
                gate = EndpointGate(r, base, GateConfig(), Batcher(ar))
                client = AsyncLLMClient(base, "unused", "m", gate=gate)
                try:
                    out.append(await client.complete(NOTE, response_format=FORMAT, max_tokens=64, temperature=0.0))
                finally:
                    await client.close()
        finally:
            await ar.aclose()
        return out

    answers = asyncio.run(calls(4))
    assert all(a.finish_reason == "stop" for a in answers)
    stats = _stats(base)
    assert stats["outcomes"] == {"400": 1, "ok": 4}  # one streamed request refused, for all four
    assert endpoint_snapshot(r, base)["streams"] is False


def test_a_refused_response_format_is_asked_once_per_endpoint_not_once_per_job(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object],
    tmp_path: Path,
) -> None:
    base = simulator("--reject-json-schema", "--latency-ms", "200")  # llama-cpp-python's refusal
    worker(base, "-c", "2")
    worker(base, "-c", "2")  # two processes: what one learned, the other knows
    assert enqueue_wait(medq_env, records(tmp_path / "recs.jsonl", 24), "fmt", timeout_s=120) == 0
    formats = _stats(base)["response_formats"]
    assert formats["json_schema"] == 1 and formats["json_object"] == 24, formats
    assert endpoint_snapshot(r, base)["formats_refused"] == 1  # what `medq endpoints` shows
    docs = run_cli(["results", "fmt"], medq_env).stdout.splitlines()
    assert len(docs) == 24 and all('"attempts": 1' in d for d in docs)


@pytest.mark.parametrize("flags", [("--latency-ms", "2000", "--parallel", "1")])
def test_giving_up_on_a_stream_frees_the_servers_slot_at_once(
    simulator: Callable[..., str], flags: tuple[str, ...],
) -> None:
    base = simulator(*flags)

    async def cut_short() -> None:
        client = AsyncLLMClient(base, "unused", "m", timeout_s=10)
        try:
            call = asyncio.ensure_future(client.complete(NOTE, response_format=FORMAT, max_tokens=64, temperature=0))
            while _stats(base)["in_flight"] == 0:
                await asyncio.sleep(0.02)
            call.cancel()  # a job cut off (its time limit), a worker stopping
            with pytest.raises(asyncio.CancelledError):
                await call
        finally:
            await client.close()

    asyncio.run(cut_short())
    for _ in range(100):
        stats = _stats(base)
        if stats["in_flight"] == 0:
            break
        time.sleep(0.02)
    assert stats["streams_closed"] == 1 and stats["in_flight"] == 0


def test_a_server_that_cuts_a_stream_for_the_next_request_is_sent_one_at_a_time_from_then_on(
    r: redis.Redis, medq_env: dict[str, str], simulator: Callable[..., str], worker: Callable[..., object],
    tmp_path: Path,
) -> None:
    # llama-cpp-python's server as users start it: one slot, and a request that waits ends the
    # running stream early (interrupt_requests): an answer without its end, work thrown away
    base = simulator("--parallel", "1", "--latency-ms", "500", "--interrupt-streams")
    worker(base, "-c", "2", env={"MEDQ_LLM__MAX_IN_FLIGHT": "4"})
    assert enqueue_wait(medq_env, records(tmp_path / "recs.jsonl", 16), "cut", timeout_s=120) == 0
    docs = run_cli(["results", "cut"], medq_env).stdout.splitlines()
    assert len(docs) == 16 and all('"status": "succeeded"' in d for d in docs)
    assert all('"attempts": 1' in d for d in docs)  # the cut call went again within its job
    stats = _stats(base)
    assert 1 <= stats["streams_cut"] <= 2, stats  # learned at the first cut, for every worker
    assert stats["requests"] == 16 + stats["streams_cut"]
    assert endpoint_snapshot(r, base)["one_at_a_time"] is True
