"""Request timeouts follow the endpoint's measured speed instead of a fixed 120 s."""

from __future__ import annotations

import threading

import pytest

from worker.llm.speed import SpeedModel

PROMPT = 1200  # tokens of a typical note plus instructions


def learned(s_per_token: float, calls: int = 10, floor_s: float = 120.0) -> SpeedModel:
    """A model that has seen ``calls`` answers of 300 tokens at the given decode speed."""
    model = SpeedModel(floor_s=floor_s)
    for _ in range(calls):
        model.observe(s_per_token * (300 + PROMPT / 8), PROMPT, 300)
    return model


def test_before_any_call_the_floor_is_used() -> None:
    model = SpeedModel(floor_s=120.0)
    assert model.timeout_for(PROMPT, 4096) == 120.0
    assert model.snapshot()["calls"] == 0
    assert "no calls" in model.describe()


def test_a_slow_endpoint_gets_time_for_a_long_answer() -> None:
    model = learned(0.2)
    timeout = model.timeout_for(PROMPT, 4096)
    assert 600 < timeout <= 900.0  # 4096 tokens at 0.2 s is ~14 min: more than 120 s, capped
    assert model.timeout_for(PROMPT, 1024) == pytest.approx(3 * 0.2 * (1024 + PROMPT / 8))


def test_a_fast_endpoint_keeps_the_floor() -> None:
    assert learned(0.005).timeout_for(PROMPT, 4096) == 120.0


def test_the_ceiling_holds() -> None:
    model = SpeedModel(floor_s=60.0, ceiling_s=300.0)
    model.observe(600.0, PROMPT, 1000)
    assert model.timeout_for(PROMPT, 4096) == 300.0


def test_calls_without_time_or_tokens_teach_nothing() -> None:
    model = SpeedModel(floor_s=120.0)
    model.observe(0.0, PROMPT, 300)
    model.observe(-1.0, PROMPT, 300)
    model.observe(5.0, 0, 0)
    model.observe(float("nan"), PROMPT, 300)
    assert model.timeout_for(PROMPT, 4096) == 120.0
    assert model.snapshot()["calls"] == 0


def test_one_wild_outlier_moves_the_timeout_at_most_twofold() -> None:
    for outlier in (0.0001, 50.0):
        model = learned(0.05)
        before = model.timeout_for(PROMPT, 2048)
        model.observe(outlier * (300 + PROMPT / 8), PROMPT, 300)
        after = model.timeout_for(PROMPT, 2048)
        assert 0.5 <= after / before <= 2.0


def test_an_endpoint_that_got_slower_is_learned_within_a_few_calls() -> None:
    model = learned(0.02, floor_s=30.0)
    for _ in range(5):
        model.observe(0.1 * (300 + PROMPT / 8), PROMPT, 300)
    rate = model.snapshot()["s_per_token"]
    assert rate == pytest.approx(0.1, rel=0.1)


def test_an_endpoint_that_got_faster_is_learned_more_slowly() -> None:
    model = learned(0.1, floor_s=30.0)
    for _ in range(3):
        model.observe(0.02 * (300 + PROMPT / 8), PROMPT, 300)
    assert 0.04 < model.snapshot()["s_per_token"] < 0.1
    for _ in range(30):
        model.observe(0.02 * (300 + PROMPT / 8), PROMPT, 300)
    assert model.snapshot()["s_per_token"] == pytest.approx(0.02, rel=0.05)


def test_concurrent_observations_do_not_raise() -> None:
    model = SpeedModel(floor_s=10.0)
    errors: list[BaseException] = []

    def hammer(i: int) -> None:
        try:
            for j in range(500):
                model.observe(0.01 * (1 + (i + j) % 3) * 400, PROMPT, 250)
                model.timeout_for(PROMPT, 1024)
                model.describe()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert model.snapshot()["calls"] == 8 * 500


def test_describe_and_snapshot_give_the_numbers() -> None:
    model = learned(0.035, calls=12)
    assert model.describe() == "~35 ms per token (12 calls)"
    snap = model.snapshot()
    assert snap["s_per_token"] == pytest.approx(0.035)
    assert (snap["calls"], snap["floor_s"], snap["ceiling_s"]) == (12, 120.0, 900.0)


@pytest.mark.parametrize(("floor_s", "ceiling_s"), [(0.0, 10.0), (-1.0, 10.0), (20.0, 10.0)])
def test_bad_bounds_are_refused(floor_s: float, ceiling_s: float) -> None:
    with pytest.raises(ValueError):
        SpeedModel(floor_s=floor_s, ceiling_s=ceiling_s)
