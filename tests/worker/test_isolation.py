"""The process's gate (worker.isolation): who may run beside whom."""

from __future__ import annotations

import asyncio

from worker.isolation import SuspectGate, Turn


def test_suspects_run_together_apart_from_healthy_jobs_and_a_lone_suspect_with_nobody() -> None:
    async def scenario() -> list[tuple[str, frozenset[str]]]:
        gate = SuspectGate()
        running: set[str] = set()
        seen: list[tuple[str, frozenset[str]]] = []  # (who started, who else was running)

        async def job(name: str, turn: Turn, hold_s: float, after_s: float = 0.0) -> None:
            await asyncio.sleep(after_s)
            async with gate.turn(turn):
                seen.append((name, frozenset(running)))
                running.add(name)
                await asyncio.sleep(hold_s)
                running.discard(name)

        await asyncio.gather(
            job("healthy-1", Turn.NORMAL, 0.05),
            job("healthy-2", Turn.NORMAL, 0.05),
            job("suspect-1", Turn.COMPANY, 0.05, after_s=0.01),
            job("suspect-2", Turn.COMPANY, 0.05, after_s=0.01),
            job("healthy-3", Turn.NORMAL, 0.01, after_s=0.02),  # arrives while suspects wait: goes after them
            job("lonely", Turn.ALONE, 0.02, after_s=0.03),
        )
        return seen

    seen = dict(asyncio.run(scenario()))
    assert seen["healthy-2"] == {"healthy-1"}  # healthy jobs share the process
    assert seen["suspect-1"] == frozenset() and seen["suspect-2"] <= {"suspect-1"}  # healthy drained first
    assert seen["lonely"] == frozenset()  # nothing beside it
    assert not seen["healthy-3"] & {"suspect-1", "suspect-2", "lonely"}


def test_a_suspect_counts_as_company_only_while_it_waits_or_runs() -> None:
    async def scenario() -> tuple[int, int, int]:
        gate = SuspectGate()
        before = gate.suspects()
        async with gate.turn(Turn.COMPANY):
            during = gate.suspects()
        return before, during, gate.suspects()

    assert asyncio.run(scenario()) == (0, 1, 0)


def test_a_company_holds_no_more_suspects_than_may_be_in_flight_and_the_rest_wait_unstarted() -> None:
    async def scenario() -> tuple[int, list[str]]:
        gate = SuspectGate(company_max=2)
        running: set[str] = set()
        most = 0
        order: list[str] = []

        async def job(name: str, turn: Turn, after_s: float = 0.0) -> None:
            nonlocal most
            await asyncio.sleep(after_s)
            async with gate.turn(turn):
                order.append(name)
                running.add(name)
                most = max(most, len({n for n in running if n.startswith("suspect")}))
                await asyncio.sleep(0.02)
                running.discard(name)

        await asyncio.gather(*(job(f"suspect-{i}", Turn.COMPANY) for i in range(5)),
                             job("healthy", Turn.NORMAL, after_s=0.005))
        return most, order

    most, order = asyncio.run(scenario())
    assert most == 2  # a second death would spare two, not five
    assert order[-1] == "healthy"  # and healthy jobs still wait for every suspect
