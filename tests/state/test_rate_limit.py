"""The shared endpoint gate against the real Redis: windows, leases, AIMD, the breaker.

Process-level proof (4 workers, one limit) is in tests/chaos; these pin the rules, on
both paths: the blocking calls (``call``) and the worker engine's (``acall``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import redis

from medq.core.errors import NoCapacity
from medq.state.endpoints import BACKOFF, FAIL, NEUTRAL, OK, TIMEOUT, GateConfig
from tests.llm_paths import PATHS, DrivenGate

URL = "http://gate.test:1/v1"


@pytest.fixture(params=PATHS)
def gate(request: pytest.FixtureRequest) -> Iterator[Callable[..., DrivenGate]]:
    made: list[DrivenGate] = []

    def make(r: redis.Redis, **kw: object) -> DrivenGate:
        cfg = {"max_wait_s": 0.05, "adaptive": False, "max_in_flight": 100, **kw}
        made.append(DrivenGate(r, URL, GateConfig(**cfg), request.param))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for g in made:
        g.close()


def test_requests_per_min_is_shared_and_says_when_there_is_room(
    r: redis.Redis, gate: Callable[..., DrivenGate]
) -> None:
    a, b = gate(r, requests_per_min=5), gate(r, requests_per_min=5)  # two workers, one endpoint
    for g in (a, b, a, b, a):
        g.release(g.acquire(10), OK)
    with pytest.raises(NoCapacity) as exc:
        b.acquire(10)
    # The first call leaves the window 61-62 s after it was admitted, not sooner.
    assert 59 < exc.value.retry_after_s <= 62
    assert "requests per min" in exc.value.message


def test_in_flight_cap_counts_leases_until_released_or_expired(r: redis.Redis, gate: Callable[..., DrivenGate]) -> None:
    g = gate(r, max_in_flight=2, lease_s=0.5)
    first, _ = g.acquire(1), g.acquire(1)
    with pytest.raises(NoCapacity, match="in flight"):
        g.acquire(1)
    g.release(first, OK)
    g.acquire(1)  # a released slot is free again
    time.sleep(0.6)  # leases of a worker that died expire
    g.acquire(1)
    g.acquire(1)
    assert g.snapshot()["in_flight"] == 2


def test_waiting_call_gets_the_slot_when_it_frees(r: redis.Redis, gate: Callable[..., DrivenGate]) -> None:
    g = gate(r, max_in_flight=1, lease_s=0.3, max_wait_s=2)
    g.acquire(1)  # never released: its lease runs out after 0.3 s
    started = time.monotonic()
    g.acquire(1)
    assert 0.2 < time.monotonic() - started < 2


def test_tokens_are_estimated_then_settled(r: redis.Redis, gate: Callable[..., DrivenGate]) -> None:
    g = gate(r, tokens_per_min=1000)
    lease = g.acquire(600)
    with pytest.raises(NoCapacity, match="tokens per min"):
        g.acquire(600)
    g.release(lease, OK, used_tokens=100)  # the call used far less than its estimate
    g.acquire(600)


def test_adaptive_cap_halves_on_backpressure_once_per_second_and_grows_back(
    r: redis.Redis, gate: Callable[..., DrivenGate]
) -> None:
    g = gate(r, adaptive=True, max_in_flight=8, start_in_flight=8)  # a server that said its 8 slots
    g.release(g.acquire(1), BACKOFF)
    assert g.snapshot()["limit"] == 4
    g.release(g.acquire(1), BACKOFF)  # the same burst of 429s: no second cut
    assert g.snapshot()["limit"] == 4
    time.sleep(1.05)
    g.release(g.acquire(1), TIMEOUT)
    assert g.snapshot()["limit"] == 2
    held = [g.acquire(1), g.acquire(1)]
    with pytest.raises(NoCapacity, match="in flight"):
        g.acquire(1)
    for lease in held:
        g.release(lease, OK)
    for _ in range(20):
        g.release(g.acquire(1), OK)
    assert 4 < g.snapshot()["limit"] <= 8  # +1/cap per success
    g.release(g.acquire(1), NEUTRAL)  # a 4xx is the request's fault: no change
    assert g.snapshot()["cuts"] == 2


def _timed_call(g: DrivenGate, seconds: float, work: float = 100.0) -> None:
    def fn() -> tuple[None, int, float]:
        time.sleep(seconds)
        return None, 10, work

    g.call(1, fn)


def test_adaptive_cap_shrinks_when_latency_shows_a_queue_before_any_error(
    r: redis.Redis, gate: Callable[..., DrivenGate]
) -> None:
    g = gate(r, adaptive=True, max_in_flight=8, start_in_flight=8)
    for _ in range(5):  # the server's own pace: 50 ms for 100 units of work
        _timed_call(g, 0.05)
    assert g.snapshot()["limit"] == 8 and g.snapshot()["latency_cuts"] == 0
    for _ in range(3):  # a bigger answer takes longer, but not per unit of work: no queue
        _timed_call(g, 0.25, work=500.0)
    assert g.snapshot()["latency_cuts"] == 0
    for _ in range(6):  # 4x the time per unit: requests wait at the server
        _timed_call(g, 0.2)
        time.sleep(0.2)  # cuts are at most one a second
    snap = g.snapshot()
    assert snap["latency_cuts"] >= 1 and snap["limit"] < 8 and snap["cuts"] == 0  # no error needed
    fixed = gate(r, adaptive=False, max_in_flight=8)
    for _ in range(3):
        _timed_call(fixed, 0.2)
    assert fixed.snapshot()["limit"] == 8  # MEDQ_LLM__ADAPTIVE=false: the cap stays


def test_an_endpoint_that_says_nothing_starts_at_one_in_flight_and_grows_while_latency_stays_flat(
    r: redis.Redis, gate: Callable[..., DrivenGate]
) -> None:
    g = gate(r, adaptive=True, max_in_flight=8)  # no slots said (no /props): a slow start
    assert g.snapshot()["limit"] == 1
    first = g.acquire(1)
    with pytest.raises(NoCapacity, match="in flight"):
        g.acquire(1)  # a second request would queue at a one-slot server
    g.release(first, OK)
    for _ in range(4):  # the server's own pace, flat: one more in flight per success (slow start)
        _timed_call(g, 0.1)
    grown = g.snapshot()["limit"]
    assert grown == 6
    _timed_call(g, 0.3)  # one call three times as slow: it queued, so no growth on it
    assert g.snapshot()["limit"] <= grown
    other = gate(r, adaptive=True, max_in_flight=8)  # another worker: the same cap, not its own start
    assert other.snapshot()["limit"] == g.snapshot()["limit"]
    said = gate(r, adaptive=True, max_in_flight=8, start_in_flight=4)
    r.delete(*said.gate.keys)
    assert said.snapshot()["limit"] == 4  # a server that says its slots starts there
    held = [said.acquire(1) for _ in range(4)]
    with pytest.raises(NoCapacity, match="in flight"):
        said.acquire(1)
    for lease in held:
        said.release(lease, OK)


def test_breaker_cools_down_then_lets_one_probe_through(r: redis.Redis, gate: Callable[..., DrivenGate]) -> None:
    g = gate(r, failure_threshold=3, cooldown_s=0.4, cooldown_max_s=5, max_in_flight=8, adaptive=True)
    for _ in range(2):
        g.release(g.acquire(1), FAIL)
    g.release(g.acquire(1), OK)  # a success in between resets the count
    for _ in range(3):
        g.release(g.acquire(1), FAIL)
    with pytest.raises(NoCapacity, match="cooling") as exc:
        g.acquire(1)
    assert 0 < exc.value.retry_after_s <= 0.4
    time.sleep(0.45)
    probe = g.acquire(1)
    with pytest.raises(NoCapacity, match="in flight"):
        g.acquire(1)  # one probe at a time after a cool-down
    g.release(probe, FAIL)  # the probe failed: cooled down again, for twice as long
    with pytest.raises(NoCapacity, match="cooling") as exc:
        g.acquire(1)
    assert 0.4 < exc.value.retry_after_s <= 0.8
    assert g.snapshot()["trips"] == 2
