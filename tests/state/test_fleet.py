"""The fleet's schemas (medq.state.fleet) on the real Redis: a worker's word lasts its TTL
by Redis's clock, another worker's word is its own, and a worker that stops is gone at once."""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio

from medq.state import fleet

TTL_MS = 300


def test_live_versions_follow_what_workers_say_and_run_out(r: redis.Redis, redis_url: str) -> None:
    async def scenario() -> None:
        a = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
        try:
            await fleet.publish(a, "old:1", [("lab_report", 1), ("clinical_note", 1)], TTL_MS)
            await fleet.publish(a, "new:2", [("lab_report", 1), ("lab_report", 2)], 60_000)
            assert await fleet.live_versions(a, "lab_report") == {1: 2, 2: 1}
            assert fleet.live_versions_sync(r, "clinical_note") == {1: 1}
            assert await fleet.live_versions(a, "discharge_summary") == {}

            # the old worker dies without a word: it drops out once its word runs out
            await asyncio.sleep(TTL_MS / 1000 + 0.1)
            assert await fleet.live_versions(a, "lab_report") == {1: 1, 2: 1}
            assert fleet.live_versions_sync(r, "clinical_note") == {}

            # the new one stops: gone at once
            await fleet.withdraw(a, "new:2", [("lab_report", 1), ("lab_report", 2)])
            assert await fleet.live_versions(a, "lab_report") == {}
        finally:
            await a.aclose()

    asyncio.run(scenario())
    # a schema whose every word ran out leaves no key behind
    assert not r.exists("medq:fleet:clinical_note")


def test_a_worker_that_keeps_saying_stays_live(r: redis.Redis, redis_url: str) -> None:
    async def scenario() -> None:
        a = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
        task = asyncio.create_task(fleet.publish_forever(a, "w:1", [("lab_report", 3)], TTL_MS))
        try:
            await asyncio.sleep(TTL_MS * 3 / 1000)  # three lifetimes of one word
            assert await fleet.live_versions(a, "lab_report") == {3: 1}
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await a.aclose()

    asyncio.run(scenario())
