"""Retry policy: what a run that hit a retryable error does next. Values and pure functions.

Budgets: charged errors (timeouts, 5xx) count against ``MEDQ_WORKER__MAX_RETRIES``;
back-pressure (busy, down, rate-limited, no capacity) only delays the job, for at most
``MEDQ_WORKER__MAX_WAIT_S``. :func:`decide` says which, and when the job comes back;
the runner (``worker.runner``) records it.

A job whose schema version this worker has not loaded is no retry at all: :func:`place`
says where it goes instead (to a live worker that has it, uncharged, or to dead letters).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from medq.core.contract import JobField, schema_queue
from medq.core.errors import NoCapacity, RetryableError, SchemaUnavailable, SchemaVersionUnavailable
from medq.core.settings import Settings

# A job deferred this often waits the longest backoff; counting on would only overflow.
_MAX_DEFERRAL_STEP = 16


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 6
    backoff_s: float = 2.0
    backoff_max_s: float = 300.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff_s < 0 or self.backoff_max_s < self.backoff_s:
            raise ValueError("need max_retries >= 0 and 0 <= backoff_s <= backoff_max_s")


def compute_backoff(
    retries: int,
    policy: RetryPolicy,
    retry_after_s: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry number ``retries + 1``.

    Exponential with "equal jitter" (half fixed, half random), so workers that
    failed together do not come back together. A server's ``Retry-After`` is a
    floor: we never come back sooner than asked. Capped at ``backoff_max_s`` so a
    delayed message always returns within the broker's visibility timeout.
    """
    exp = min(policy.backoff_max_s, policy.backoff_s * (2 ** max(retries, 0)))
    delay = exp / 2 + rand() * exp / 2
    if retry_after_s is not None and retry_after_s > delay:
        delay = retry_after_s
    return min(delay, policy.backoff_max_s)


@dataclass(frozen=True)
class Limits:
    """The settings :func:`decide` reads."""

    policy: RetryPolicy
    max_wait_s: float  # MEDQ_WORKER__MAX_WAIT_S: back-pressure delays a job this long at most
    max_countdown_s: float  # a put-back message must come back within the visibility timeout

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        w = settings.worker
        return cls(RetryPolicy(w.max_retries, w.retry_backoff_s, w.retry_backoff_max_s), w.max_wait_s,
                   settings.max_countdown_s)


@dataclass(frozen=True)
class RunFacts:
    """What the job's state says of its earlier runs (START_LUA hands it out)."""

    failures: int  # charged errors before this run
    deferrals: int  # back-pressure put-backs before this run
    waited_s: float  # since its first run


@dataclass(frozen=True)
class Retry:
    """Run the job again in ``countdown_s``. ``counter``: the job hash's count this run
    adds one to (``JobField.FAILURES`` or ``DEFERRALS``). ``unsent``: put back by medq's
    own limits (or for a schema version not loaded here) before any request: a delivery,
    not an attempt, so ``attempts`` still says how often the model was asked."""

    countdown_s: float
    counter: str
    unsent: bool


@dataclass(frozen=True)
class GiveUp:
    """A budget is spent: a dead letter, ``why`` says which. The run is still counted
    first (``counter``, ``unsent``, as for :class:`Retry`), so the dead letter's attempts
    are the runs that reached the model."""

    why: str
    countdown_s: float
    counter: str
    unsent: bool


def decide(
    error: RetryableError, facts: RunFacts, limits: Limits, rand: Callable[[], float] = random.random,
) -> Retry | GiveUp:
    """What a run that raised ``error`` does next: retry later, or give up."""
    unsent = isinstance(error, (NoCapacity, SchemaVersionUnavailable))
    policy = limits.policy
    why: str | None = None
    if error.charged:
        counter = JobField.FAILURES
        n = facts.failures + 1
        if n > policy.max_retries:
            why = f"gave up after {n} failed attempts (MEDQ_WORKER__MAX_RETRIES={policy.max_retries})"
        countdown_s = compute_backoff(n - 1, policy, error.retry_after_s, rand)
    else:
        counter = JobField.DEFERRALS
        if facts.waited_s > limits.max_wait_s:
            why = f"gave up after waiting {facts.waited_s:.0f}s (MEDQ_WORKER__MAX_WAIT_S)"
        if isinstance(error, NoCapacity) and error.retry_after_s is not None:
            # The gate knows when there is room again: come back then, spread over a second.
            countdown_s = error.retry_after_s + rand()
        else:
            countdown_s = compute_backoff(min(facts.deferrals, _MAX_DEFERRAL_STEP), policy, error.retry_after_s, rand)
    countdown_s = min(countdown_s, limits.max_countdown_s)
    if why is not None:
        return GiveUp(why, countdown_s, counter, unsent)
    return Retry(countdown_s, counter, unsent)


@dataclass(frozen=True)
class HandOff:
    """Put the job back on ``queue``, which only the workers that have its schema version
    take, at once and uncharged: a delivery, neither an attempt nor a deferral (no backoff
    grows with it). ``error`` says why, on the job while it waits."""

    queue: str
    error: SchemaVersionUnavailable


def _versions_text(versions: list[int]) -> str:
    return ("version " if len(versions) == 1 else "versions ") + ", ".join(str(v) for v in versions)


def place(schema: str, version: int, batch: str, here: list[int], live: Mapping[int, int]) -> HandOff | SchemaUnavailable:
    """Where a job of ``schema`` ``version`` goes from a worker that has not loaded that
    version (``here``: the versions it has, none for a schema it does not know). ``live``:
    the versions live workers have loaded (``medq.state.fleet.live_versions``), each with
    how many workers. Handed on if one of them has it; else a dead letter that says what
    to do, which plain ``medq requeue`` runs again once a worker has it."""
    has_here = _versions_text(here) if here else f"no schema {schema}"
    if live.get(version, 0) > 0:
        return HandOff(schema_queue(schema, version), SchemaVersionUnavailable(
            f"schema {schema} version {version} is not loaded in the worker that took the job (it has {has_here}); "
            f"handed on to the {live[version]} live worker(s) that have it"
        ))
    in_fleet = sorted(v for v, n in live.items() if n > 0)
    fleet_has = _versions_text(in_fleet) if in_fleet else "none"
    return SchemaUnavailable(
        f"schema {schema} version {version} is not loaded in any live worker (this worker has {has_here}; "
        f"live workers have {fleet_has} of {schema}). Start a worker whose schema folders (configs/schemas, "
        f"MEDQ_SCHEMAS_DIRS) hold {schema} version {version} (e.g. the old file kept as {schema}.v{version}.yaml), "
        f"then run `medq requeue {batch}`"
    )
