"""worker.policy.decide: what a run that hit a retryable error does next, one row per case;
worker.policy.place: where a job goes from a worker without its schema version.

Each row: the error (its kind and Retry-After), what the job's state says of its earlier
runs (failures, deferrals, seconds since its first run), the limits, and the decision.
``rand`` is fixed at 0.5, so backoffs are exact: equal jitter gives 3/4 of the step.
"""

from __future__ import annotations

import pytest

from medq.core.contract import JobField
from medq.core.errors import (
    EndpointTimeout,
    EndpointUnavailable,
    NoCapacity,
    Overloaded,
    RateLimited,
    RetryableError,
    SchemaUnavailable,
    SchemaVersionUnavailable,
    ServerError,
    TimeLimitExceeded,
)
from medq.core.settings import Settings
from worker.policy import GiveUp, HandOff, Limits, Retry, RetryPolicy, RunFacts, decide, place

F, D = JobField.FAILURES, JobField.DEFERRALS


def limits(max_retries: int = 6, max_wait_s: float = 3600.0, max_countdown_s: float = 300.0) -> Limits:
    return Limits(RetryPolicy(max_retries, backoff_s=2.0, backoff_max_s=300.0), max_wait_s, max_countdown_s)


ROWS: list[tuple[str, RetryableError, RunFacts, Limits, Retry | GiveUp]] = [
    # charged errors: the budget is MEDQ_WORKER__MAX_RETRIES failures, backoff 2 s doubling
    ("first timeout", EndpointTimeout("t"), RunFacts(0, 0, 0.0), limits(), Retry(1.5, F, False)),
    ("third 5xx", ServerError("s"), RunFacts(2, 0, 10.0), limits(), Retry(6.0, F, False)),
    ("time limit", TimeLimitExceeded("t"), RunFacts(1, 5, 10.0), limits(), Retry(3.0, F, False)),
    ("last failure allowed", ServerError("s"), RunFacts(5, 0, 0.0), limits(), Retry(48.0, F, False)),
    ("one failure too many", ServerError("s"), RunFacts(6, 0, 0.0), limits(),
     GiveUp("gave up after 7 failed attempts (MEDQ_WORKER__MAX_RETRIES=6)", 96.0, F, False)),
    ("no retries at all", EndpointTimeout("t"), RunFacts(0, 0, 0.0), limits(max_retries=0),
     GiveUp("gave up after 1 failed attempts (MEDQ_WORKER__MAX_RETRIES=0)", 1.5, F, False)),
    ("Retry-After is a floor", ServerError("s", retry_after_s=20.0), RunFacts(0, 0, 0.0), limits(),
     Retry(20.0, F, False)),
    ("capped by the visibility timeout", ServerError("s"), RunFacts(5, 0, 0.0), limits(max_countdown_s=30.0),
     Retry(30.0, F, False)),
    # back-pressure: never charged, only MEDQ_WORKER__MAX_WAIT_S since the first run
    ("endpoint down", EndpointUnavailable("d"), RunFacts(3, 0, 5.0), limits(), Retry(1.5, D, False)),
    ("rate limited, Retry-After", RateLimited("r", retry_after_s=12.0), RunFacts(0, 2, 5.0), limits(),
     Retry(12.0, D, False)),
    ("overloaded, many deferrals", Overloaded("o"), RunFacts(0, 40, 60.0), limits(), Retry(225.0, D, False)),
    ("waited too long", Overloaded("o"), RunFacts(0, 3, 3601.0), limits(),
     GiveUp("gave up after waiting 3601s (MEDQ_WORKER__MAX_WAIT_S)", 12.0, D, False)),
    ("failures do not end a wait", EndpointUnavailable("d"), RunFacts(99, 0, 0.0), limits(max_retries=0),
     Retry(1.5, D, False)),
    # put back by medq's own limits before any request: a delivery, not an attempt
    ("no capacity, the gate knows when", NoCapacity("n", retry_after_s=4.0), RunFacts(0, 0, 1.0), limits(),
     Retry(4.5, D, True)),
    ("no capacity, no hint", NoCapacity("n"), RunFacts(0, 1, 1.0), limits(), Retry(3.0, D, True)),
    ("schema version not here", SchemaVersionUnavailable("v"), RunFacts(0, 0, 0.0), limits(), Retry(1.5, D, True)),
    ("no capacity for too long", NoCapacity("n", retry_after_s=4.0), RunFacts(0, 9, 7200.0), limits(),
     GiveUp("gave up after waiting 7200s (MEDQ_WORKER__MAX_WAIT_S)", 4.5, D, True)),
]


@pytest.mark.parametrize(("error", "facts", "lims", "expected"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_decide(error: RetryableError, facts: RunFacts, lims: Limits, expected: Retry | GiveUp) -> None:
    assert decide(error, facts, lims, rand=lambda: 0.5) == expected


def test_limits_come_from_the_settings() -> None:
    s = Settings(worker={"max_retries": 2, "max_wait_s": 60, "retry_backoff_s": 1, "retry_backoff_max_s": 10})
    lims = Limits.from_settings(s)
    assert lims == Limits(RetryPolicy(2, 1.0, 10.0), 60.0, s.max_countdown_s)
    assert decide(ServerError("s"), RunFacts(2, 0, 0.0), lims, rand=lambda: 0.5) == GiveUp(
        "gave up after 3 failed attempts (MEDQ_WORKER__MAX_RETRIES=2)", 3.0, F, False
    )


# worker.policy.place: a job of a schema version the worker has not loaded. Each row: the
# versions here, the live workers per version in the fleet, and where the job goes.
PLACES: list[tuple[str, list[int], dict[int, int], str | None]] = [
    ("an upgraded worker, an old one alive", [2], {1: 1, 2: 1}, "medq.schema.lab_report.v1"),
    ("a worker without the schema, a capable one alive", [], {1: 2}, "medq.schema.lab_report.v1"),
    ("only newer versions alive", [2], {2: 3}, None),
    ("no worker has the schema at all", [], {}, None),
    ("a version that ran out is no worker", [], {1: 0}, None),
]


@pytest.mark.parametrize(("here", "live", "queue"), [p[1:] for p in PLACES], ids=[p[0] for p in PLACES])
def test_place(here: list[int], live: dict[int, int], queue: str | None) -> None:
    where = place("lab_report", 1, "ward-3", here, live)
    if queue is not None:
        assert isinstance(where, HandOff) and where.queue == queue
        assert where.error.kind == "schema_version_unavailable" and not where.error.charged
        return
    # no live worker has it: a dead letter that names the schema, the version and what to do
    assert isinstance(where, SchemaUnavailable) and where.kind == "schema_unavailable"
    assert "schema lab_report version 1 is not loaded in any live worker" in where.message
    assert "lab_report.v1.yaml" in where.message and "`medq requeue ward-3`" in where.message
    assert ("this worker has version 2" if here else "this worker has no schema lab_report") in where.message
