"""Retry policy for transient endpoint errors: a value, and a pure backoff function."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


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
