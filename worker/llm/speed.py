"""Request timeouts that follow an endpoint's measured speed.

A fixed 120 s cuts off honest calls on a slow CPU endpoint (4096 tokens at
0.2 s each is 14 minutes) and waits far too long on a fast GPU one. Instead we
learn, per endpoint and per process, how many seconds a call takes per unit of
work, and allow a generous multiple of what a full-length answer should take.
Latencies include the time a request queues at a busy server, so the estimate
covers concurrency without any extra bookkeeping.
"""

from __future__ import annotations

import math
import threading
from typing import Any

# Prefill on a CPU is roughly an order of magnitude faster per token than decode.
PREFILL_SHARE = 1 / 8
# A call may take this many times the expected time before we give up on it (never
# less than the floor, MEDQ_LLM__TIMEOUT_S): variance between calls is large, a false
# timeout is costly. A call that timed out teaches nothing: a hung server, or one
# queueing requests, is not a slow one, and learning from it would stretch every
# later timeout towards the ceiling.
SAFETY_FACTOR = 3.0
# Updates in log space, so speed-ups and slow-downs weigh alike. A slower
# endpoint is learned fast (a timeout there loses work), a faster one slowly; no
# single call moves the estimate by more than a factor of 2 either way.
_ALPHA_SLOWER = 0.5
_ALPHA_FASTER = 0.2
_MAX_STEP = math.log(4.0)


def work_units(prompt_tokens: int, completion_tokens: int) -> float:
    """Decode-token equivalents of a call: completion tokens plus the prompt's prefill share."""
    return max(completion_tokens, 0) + max(prompt_tokens, 0) * PREFILL_SHARE


class SpeedModel:
    """Per endpoint, in one process: how long a call takes per token, learned from the calls it made."""

    def __init__(self, floor_s: float, ceiling_s: float = 900.0) -> None:
        if not 0 < floor_s <= ceiling_s:
            raise ValueError("need 0 < floor_s <= ceiling_s")
        self.floor_s = float(floor_s)
        self.ceiling_s = float(ceiling_s)
        self._lock = threading.Lock()
        self._log_rate: float | None = None  # log of seconds per work unit
        self._calls = 0

    def observe(self, latency_s: float, prompt_tokens: int, completion_tokens: int) -> None:
        """Learn from a finished call; calls without a latency or without tokens teach nothing."""
        work = work_units(prompt_tokens, completion_tokens)
        if not (latency_s > 0 and work > 0 and math.isfinite(latency_s)):
            return
        with self._lock:
            self._update(math.log(latency_s / work))
            self._calls += 1

    def _update(self, log_rate: float) -> None:
        if self._log_rate is None:
            self._log_rate = log_rate
            return
        step = max(-_MAX_STEP, min(_MAX_STEP, log_rate - self._log_rate))
        self._log_rate += step * (_ALPHA_SLOWER if step > 0 else _ALPHA_FASTER)

    def seconds_per_token(self) -> float | None:
        """The current estimate of seconds per work unit (None before any call)."""
        with self._lock:
            return None if self._log_rate is None else math.exp(self._log_rate)

    def timeout_for(self, prompt_tokens: int, max_tokens: int) -> float:
        """Seconds to allow a call that may generate all ``max_tokens``: floor_s until a call was seen."""
        rate = self.seconds_per_token()
        if rate is None:
            return self.floor_s
        expected = rate * work_units(prompt_tokens, max_tokens)
        return min(self.ceiling_s, max(self.floor_s, SAFETY_FACTOR * expected))

    def first_token_for(self, prompt_tokens: int) -> float:
        """Seconds to allow a streamed call before its first token: the server reads the whole
        prompt first (``SAFETY_FACTOR`` times its measured prefill time), at least ``floor_s``."""
        rate = self.seconds_per_token()
        if rate is None:
            return self.floor_s
        return min(self.ceiling_s, max(self.floor_s, SAFETY_FACTOR * rate * work_units(prompt_tokens, 0)))

    def describe(self) -> str:
        """One line for logs, e.g. "~35 ms per token (12 calls)"."""
        snap = self.snapshot()
        if snap["s_per_token"] is None:
            return "speed unknown (no calls yet)"
        ms = snap["s_per_token"] * 1000
        shown = f"{ms:.0f}" if ms >= 10 else f"{ms:.2g}"
        calls = "call" if snap["calls"] == 1 else "calls"
        return f"~{shown} ms per token ({snap['calls']} {calls})"

    def snapshot(self) -> dict[str, Any]:
        """The numbers behind the timeouts, for logs and metrics."""
        with self._lock:
            rate = None if self._log_rate is None else math.exp(self._log_rate)
            return {
                "s_per_token": rate,
                "calls": self._calls,
                "floor_s": self.floor_s,
                "ceiling_s": self.ceiling_s,
            }
