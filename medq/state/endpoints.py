"""Limits per endpoint, shared by every worker on every host: one Redis, two Lua scripts.

Celery's ``rate_limit`` counts per worker, so four workers with ``10/m`` send 40 a
minute to a GPU server that can take 10. Here every call to an endpoint first takes
a *lease* from Redis and gives it back afterwards; both steps are one atomic script
that reads the clock with Redis ``TIME``, so the hosts' clocks do not matter.

What a lease checks, per endpoint:

- **requests per minute** and **tokens per minute**, counted in one-second buckets
  over a sliding window. A call is counted in the second it was admitted and stays
  counted for ``WINDOW_S`` seconds plus one second of slack for the transit to the
  server, so the server never sees more than the limit in any 60 s. Tokens are
  estimated before the call (prompt characters / 4 + ``max_tokens``, as OpenAI counts
  them, but one token per CJK character) and settled with the real usage afterwards.
- **requests in flight**, as leased slots in a sorted set scored by their expiry: a
  worker killed mid-call frees its slot when the lease runs out.
- The in-flight cap is **adaptive** (AIMD, as TCP does it): it halves on back-pressure
  (429, 503, timeouts; at most once per second) and grows by ``1/cap`` per success,
  i.e. by one per round of ``cap`` successes, up to ``MEDQ_LLM__MAX_IN_FLIGHT``.
  An endpoint that has not said its slots starts at ``min_in_flight`` (a **slow start**,
  as TCP's: one more in flight per success while each call's latency stays flat, up to the
  cap of the last cut, then one more per round); one that said them (llama.cpp's
  ``/props``) starts there. Many local servers work on one request at a time and say
  nothing: eight requests sent at once would wait behind each other there.
  It follows **latency** too, before any error (TCP Vegas, Netflix's concurrency-limits):
  each success reports its time per unit of work (a generated token, or eight prompt
  tokens), and the endpoint keeps a floor (the least seen, drifting up slowly) and a
  recent average. A recent average over ``LATENCY_TOLERANCE`` times the floor means
  requests queue at the server: the cap shrinks by that excess (tolerance x floor /
  recent, between a tenth and a half; at most once per second) instead of growing.
  A server that works on 2 requests at once and is sent 8 answers each in 4 times its time, and then times out; this stops at the queue.
- A **circuit breaker**: after ``failure_threshold`` failures in a row (refused
  connections, 5xx, timeouts) the endpoint is cooled down for ``cooldown_s``,
  doubling up to ``cooldown_max_s`` while probes keep failing. After a cool-down the
  cap restarts at ``min_in_flight``, so one probe goes first.

A call that finds no room waits, sleeping until the window frees a slot (the script
says when) or polling with backoff for an in-flight slot, for at most
``MEDQ_LLM__MAX_WAIT_S``; then it raises :class:`~medq.core.errors.NoCapacity` and the
job is put back with a countdown instead of holding a worker slot.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import hashlib
import math
import random
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import redis

from medq.core.contract import KEY_PREFIX
from medq.core.errors import (
    EndpointTimeout,
    EndpointUnavailable,
    NoCapacity,
    Overloaded,
    RateLimited,
    ServerError,
)
from medq.core.ids import new_id
from medq.core.tokens import estimate_text_tokens
from medq.core.urls import redact_url
from medq.state.metrics import metrics

WINDOW_S = 60
GUARD_S = 1  # transit slack: a request admitted at the end of a second arrives in the next
# One-second buckets counted: a call admitted in second b blocks the limit until second
# b + BUCKETS, so two calls the limit apart are always WINDOW_S + GUARD_S seconds apart.
BUCKETS = WINDOW_S + GUARD_S + 1
CUT_INTERVAL_MS = 1000  # one overload event (a burst of 429s) halves the cap once
# Recent latency per unit of work over this many times its floor: requests queue at the server.
LATENCY_TOLERANCE = 1.5
LATENCY_MIN_MS = 50.0  # faster calls say nothing of a queue (see _latency)

# Outcomes of a call, as the gate sees them.
OK = "ok"
BACKOFF = "backoff"  # the server pushed back (429, 503, busy): shrink the cap
TIMEOUT = "timeout"  # shrink the cap, and count towards the breaker
FAIL = "fail"  # refused connection, 5xx: count towards the breaker
NEUTRAL = "neutral"  # the request was at fault (4xx): the endpoint is fine

ACQUIRE_LUA = """
-- KEYS: state, inflight, req, tok
-- ARGV: lease_id, lease_ms, max_in_flight, min_in_flight, rpm, tpm, est_tokens, window_s, start_in_flight,
--       learned_ttl_ms
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now = sec * 1000 + math.floor(tonumber(t[2]) / 1000)
local max_if, min_if = tonumber(ARGV[3]), tonumber(ARGV[4])
local rpm, tpm, est, window = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local st = redis.call('HMGET', KEYS[1], 'limit', 'cool_until', 'fmt', 'nostream', 'learned_at', 'serial')
local cool_until = tonumber(st[2]) or 0
if cool_until > now then return {0, cool_until - now, 'cooling'} end
if st[6] then max_if = 1 end  -- it cut a stream for the next request: one at a time (learn_refusal)
local limit = math.min(math.max(tonumber(st[1]) or tonumber(ARGV[9]), min_if), max_if)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local n = redis.call('ZCARD', KEYS[2])
if n >= math.floor(limit) then return {0, 0, 'in_flight'} end

-- sum of the buckets still in the window, and when enough of them leave it
local function check(key, cap, need)
  local fields = {}
  for b = sec - window + 1, sec do fields[#fields + 1] = b end
  local vals = redis.call('HMGET', key, unpack(fields))
  local total = 0
  for i = 1, #vals do total = total + (tonumber(vals[i]) or 0) end
  if total + need <= cap then return 0 end
  local freed = 0
  for i = 1, #vals do
    freed = freed + (tonumber(vals[i]) or 0)
    if total - freed + need <= cap then return (fields[i] + window) * 1000 - now end
  end
  return window * 1000
end
local function sweep(key)
  if redis.call('HLEN', key) > window + 30 then
    local old = {}
    for _, f in ipairs(redis.call('HKEYS', key)) do
      if tonumber(f) <= sec - window then old[#old + 1] = f end
    end
    if #old > 0 then redis.call('HDEL', key, unpack(old)) end
  end
end
if rpm > 0 then
  local wait = check(KEYS[3], rpm, 1)
  if wait > 0 then return {0, wait, 'requests_per_min'} end
end
if tpm > 0 then
  est = math.min(est, tpm)  -- a request larger than the whole budget still runs, alone
  local wait = check(KEYS[4], tpm, est)
  if wait > 0 then return {0, wait, 'tokens_per_min'} end
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]) * 2)
if rpm > 0 then
  redis.call('HINCRBY', KEYS[3], sec, 1)
  redis.call('EXPIRE', KEYS[3], window + 5)
  sweep(KEYS[3])
end
if tpm > 0 then
  redis.call('HINCRBY', KEYS[4], sec, est)
  redis.call('EXPIRE', KEYS[4], window + 5)
  sweep(KEYS[4])
end
-- what the endpoint refused before (learn_refusal), while it is fresh
local fmt, nostream = '', ''
if (tonumber(st[5]) or 0) + tonumber(ARGV[10]) > now then fmt, nostream = st[3] or '', st[4] or '' end
return {1, sec, n + 1, est, fmt, nostream}
"""

RELEASE_LUA = """
-- KEYS: state, inflight, tok
-- ARGV: lease_id, outcome, bucket, est_tokens, used_tokens, max_in_flight, min_in_flight,
--       adaptive, failure_threshold, cooldown_ms, cooldown_max_ms, window_s,
--       latency (ms per unit of work; 0: not measured), latency_tolerance, start_in_flight
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now = sec * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREM', KEYS[2], ARGV[1])
local outcome = ARGV[2]
local bucket, est, used = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if est > 0 and used >= 0 and bucket > sec - tonumber(ARGV[12]) and redis.call('HEXISTS', KEYS[3], bucket) == 1 then
  redis.call('HINCRBY', KEYS[3], bucket, used - est)
end
local max_if, min_if = tonumber(ARGV[6]), tonumber(ARGV[7])
local adaptive = ARGV[8] == '1'
local st = redis.call('HMGET', KEYS[1], 'limit', 'last_cut', 'fails', 'cool_ms', 'ssthresh')
local limit = math.min(math.max(tonumber(st[1]) or tonumber(ARGV[15]), min_if), max_if)
local last_cut = tonumber(st[2]) or 0
local fails = tonumber(st[3]) or 0
local base_cool, max_cool = tonumber(ARGV[10]), tonumber(ARGV[11])
local cool_ms = tonumber(st[4]) or base_cool
if outcome == 'ok' then
  local sample = tonumber(ARGV[13]) or 0
  local queued = false
  local flat = true  -- this call took no longer than the floor allows: it did not queue either
  if adaptive and sample > 0 then
    local lt = redis.call('HMGET', KEYS[1], 'lat_floor', 'lat_recent')
    local floor = math.min(tonumber(lt[1]) or sample, sample)
    floor = floor + (sample - floor) * 0.002  -- drifts up: a floor from a faster past fades, slowly
    local recent = (tonumber(lt[2]) or sample) * 0.8 + sample * 0.2
    redis.call('HSET', KEYS[1], 'lat_floor', floor, 'lat_recent', recent)
    queued = recent > floor * tonumber(ARGV[14])
    flat = sample <= floor * tonumber(ARGV[14])
  end
  if queued and now - last_cut >= 1000 then
    -- Vegas's gradient: as many in flight as would keep the latency within tolerance
    local lt2 = redis.call('HMGET', KEYS[1], 'lat_floor', 'lat_recent')
    local gradient = tonumber(ARGV[14]) * tonumber(lt2[1]) / tonumber(lt2[2])
    limit = math.max(min_if, limit * math.max(0.5, math.min(gradient, 0.9)))
    redis.call('HSET', KEYS[1], 'last_cut', now, 'ssthresh', limit)
    redis.call('HINCRBY', KEYS[1], 'latency_cuts', 1)
  elseif not queued and flat then
    -- slow start (TCP's): one more per success up to the last cut ('ssthresh'), then one per round
    local step = limit < (tonumber(st[5]) or max_if) and 1 or 1 / limit
    if adaptive then limit = math.min(max_if, limit + step) else limit = max_if end
  end
  redis.call('HSET', KEYS[1], 'limit', limit, 'fails', 0, 'cool_ms', base_cool)
  redis.call('HINCRBY', KEYS[1], 'ok', 1)
  return {1, tostring(limit)}
end
if (outcome == 'backoff' or outcome == 'timeout') and adaptive and now - last_cut >= 1000 then
  limit = math.max(min_if, math.floor(limit / 2))
  redis.call('HSET', KEYS[1], 'limit', limit, 'last_cut', now, 'ssthresh', limit)
  redis.call('HINCRBY', KEYS[1], 'cuts', 1)
end
if outcome == 'fail' or outcome == 'timeout' then
  fails = fails + 1
  redis.call('HINCRBY', KEYS[1], 'errors', 1)
  if fails >= tonumber(ARGV[9]) then
    -- cool down; afterwards one probe at a time, and the next failure cools down again, longer
    redis.call('HSET', KEYS[1], 'cool_until', now + cool_ms, 'cool_ms', math.min(cool_ms * 2, max_cool),
               'fails', tonumber(ARGV[9]) - 1, 'limit', min_if, 'ssthresh', math.max(min_if, limit / 2))
    redis.call('HINCRBY', KEYS[1], 'trips', 1)
    return {2, tostring(cool_ms)}
  end
  redis.call('HSET', KEYS[1], 'fails', fails)
end
return {0, tostring(limit)}
"""


# What an endpoint refused, learned once for every worker (EndpointGate.learn_refusal): the
# response_format it takes (a rank the caller orders, higher = looser; kept if higher),
# whether it streams, and whether it cuts a running stream when another request comes
# (llama-cpp-python's interrupt_requests: then one request at a time, whatever the cap).
# Forgotten an hour after the last refusal, in case the server changed.
LEARN_LUA = """
-- KEYS: state   ARGV: what ('fmt', 'nostream' or 'serial'), value (fmt: its rank), ttl_ms
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cur = redis.call('HMGET', KEYS[1], 'fmt', 'learned_at')
if (tonumber(cur[2]) or 0) + tonumber(ARGV[3]) <= now then
  redis.call('HDEL', KEYS[1], 'fmt', 'nostream', 'serial')
  cur[1] = false
end
if ARGV[1] == 'fmt' then
  if (tonumber(cur[1]) or -1) < tonumber(ARGV[2]) then redis.call('HSET', KEYS[1], 'fmt', ARGV[2]) end
else
  redis.call('HSET', KEYS[1], ARGV[1], 1)
end
redis.call('HSET', KEYS[1], 'learned_at', now)
return 1
"""
LEARNED_TTL_S = 3600

# Told when a call of the task it is set in (a job's) is let through to the model: the
# worker's per-job time limit counts from then (worker.runner), not while it waits for a slot.
_granted: contextvars.ContextVar[asyncio.Event | None] = contextvars.ContextVar("medq_granted", default=None)


def watch_grants() -> asyncio.Event:
    """An event set when a call of the current task (and of tasks it starts) gets a lease."""
    event = asyncio.Event()
    _granted.set(event)
    return event


@dataclass(frozen=True)
class Refusals:
    """What an endpoint refused before, as the last lease said: the rank of the loosest
    response_format found refused (-1: none) and whether streamed answers were."""

    format_rank: int = -1
    stream: bool = False


def endpoint_id(url: str) -> str:
    # Of the URL as shown: a short hash of a password is no place to keep one, and the
    # URL with or without its userinfo names the same endpoint's keys.
    return hashlib.sha1(redact_url(url).rstrip("/").encode()).hexdigest()[:12]


def endpoint_keys(url: str) -> tuple[str, str, str, str]:
    """state hash, in-flight leases, request buckets, token buckets. The ``{id}`` hash
    tag keeps one endpoint's keys in one Redis Cluster slot."""
    base = f"{KEY_PREFIX}:ep:{{{endpoint_id(url)}}}"
    return f"{base}:state", f"{base}:inflight", f"{base}:req", f"{base}:tok"


def outcome_of(exc: BaseException | None) -> str:
    if exc is None:
        return OK
    if isinstance(exc, (RateLimited, Overloaded)):
        return BACKOFF
    if isinstance(exc, EndpointTimeout):
        return TIMEOUT
    if isinstance(exc, (EndpointUnavailable, ServerError)):
        return FAIL
    return NEUTRAL


def estimate_tokens(messages: list[dict[str, str]], max_tokens: int) -> int:
    """What a call may cost before it is made: the prompt's tokens plus ``max_tokens``.

    The prompt is counted by :func:`medq.core.tokens.estimate_text_tokens`: characters / 4,
    except CJK characters at one token each, since characters / 4 would admit a Chinese
    note at a quarter (or less) of what the server then charges against the limit."""
    return sum(estimate_text_tokens(m.get("content") or "") for m in messages) + max_tokens


@dataclass(frozen=True)
class GateConfig:
    requests_per_min: int | None = None
    tokens_per_min: int | None = None
    max_in_flight: int = 8
    min_in_flight: int = 1
    adaptive: bool = True
    max_wait_s: float = 5.0
    failure_threshold: int = 3
    cooldown_s: float = 2.0
    cooldown_max_s: float = 60.0
    lease_s: float = 130.0  # longer than a call may take: the HTTP timeout plus slack
    # Where the cap of an endpoint not seen before starts (None: min_in_flight, a slow start;
    # a server that says its slots starts there). Not adaptive: always max_in_flight.
    start_in_flight: int | None = None
    # Wait for an in-flight slot without a deadline (the job's own bounds it): for an endpoint
    # that is the worker's only one, where a job put back would only come back to the same line.
    patient: bool = False

    @property
    def start(self) -> int:
        if not self.adaptive:
            return self.max_in_flight
        return min(max(self.start_in_flight or self.min_in_flight, self.min_in_flight), self.max_in_flight)

    @classmethod
    def from_settings(cls, llm: Any) -> GateConfig:
        return cls(
            requests_per_min=llm.requests_per_min,
            tokens_per_min=llm.tokens_per_min,
            max_in_flight=max(llm.max_in_flight, 1),
            min_in_flight=max(min(llm.min_in_flight, llm.max_in_flight), 1),
            adaptive=llm.adaptive,
            max_wait_s=llm.max_wait_s,
            failure_threshold=max(llm.failure_threshold, 1),
            cooldown_s=llm.cooldown_s,
            cooldown_max_s=max(llm.cooldown_max_s, llm.cooldown_s),
            lease_s=llm.timeout_s + 10,
        )


@dataclass(frozen=True)
class _Ask:
    """A step of taking a lease: run the acquire script with these arguments, send back its reply."""

    args: list[Any]


@dataclass(frozen=True)
class _Wait:
    """A step of taking a lease: wait this long (or less: a freed slot may wake the waiter)."""

    seconds: float


@dataclass(frozen=True)
class Lease:
    lease_id: str
    bucket: int
    est_tokens: int


class EndpointGate:
    """The shared limits of one endpoint: one per endpoint per process.

    ``acquire`` / ``release`` / ``call`` block (thread-safe); ``aacquire`` /
    ``arelease`` / ``acall`` are the same steps through the worker engine's
    :class:`~worker.pipeline.Batcher`. There, at most ``max_in_flight`` calls of this process ask Redis
    at once (the others queue in the process), and a call that ends wakes the next
    waiter instead of letting it poll."""

    def __init__(self, r: redis.Redis, url: str, config: GateConfig, batcher: Any = None) -> None:
        self.url = redact_url(url)  # in metrics labels and messages
        self.config = config
        self.keys = endpoint_keys(url)
        self._r = r
        self._acquire = r.register_script(ACQUIRE_LUA)
        self._release = r.register_script(RELEASE_LUA)
        self._learn = r.register_script(LEARN_LUA)
        self.refused = Refusals()  # as the last lease of this process said
        self._rng = random.Random()
        self._rng_lock = threading.Lock()
        self._batcher = batcher  # worker.pipeline.Batcher: the engine's pipelined Redis calls
        self._local: Any = None  # asyncio.Semaphore, made in the loop that uses it
        # calls of this process waiting on the shared limits, first come first woken: a slot
        # given back wakes one of them, not all (with several processes on one cap, waking
        # all sent one acquire script per waiter for each slot, and all but one were refused)
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    # The steps of taking a lease are written once, as a generator (:meth:`_acquiring`)
    # that yields what it needs done: run the acquire script with these arguments
    # (:class:`_Ask`; it is sent the reply), or wait (:class:`_Wait`). ``acquire`` does
    # them blocking, ``aacquire`` on the worker engine's loop and its batched Redis.

    # ------------------------------------------------------------- blocking

    def acquire(self, est_tokens: int, lease_s: float | None = None) -> Lease:
        """A slot for one call, waiting up to ``max_wait_s``; else :class:`NoCapacity`.
        ``lease_s``: how long the call may take (default ``config.lease_s``)."""
        steps = self._acquiring(est_tokens, lease_s)
        try:
            step = next(steps)
            while True:
                if isinstance(step, _Wait):
                    time.sleep(step.seconds)
                    step = next(steps)
                else:
                    step = steps.send(self._acquire(keys=list(self.keys), args=step.args))
        except StopIteration as done:
            lease: Lease = done.value
            return lease

    def release(self, lease: Lease, outcome: str, used_tokens: int | None = None, latency: float = 0.0) -> None:
        state, inflight, _, tok = self.keys
        self._release(keys=[state, inflight, tok], args=self._release_args(lease, outcome, used_tokens, latency))

    def call(self, est_tokens: int, fn: Any, lease_s: float | None = None) -> Any:
        """Run ``fn()`` under a lease; ``fn`` returns ``(result, used_tokens)`` or
        ``(result, used_tokens, work)``: with the work done (``worker.llm.speed.work_units``), its time per
        unit is the latency signal of the adaptive cap. An error is reported as its
        outcome (:func:`outcome_of`: back-pressure, failure, or the request's fault)."""
        lease = self.acquire(est_tokens, lease_s)
        started = time.monotonic()
        try:
            result, used, *work = fn()
        except BaseException as exc:
            self.release(lease, outcome_of(exc))
            raise
        self.release(lease, OK, used, _latency(started, work))
        return result

    # ------------------------------------------------------------- asyncio

    async def aacquire(self, est_tokens: int, lease_s: float | None = None) -> Lease:
        """:meth:`acquire` on the worker engine's loop. This process's own calls queue
        here first, in order, without a deadline: the worker took their messages to run
        them, and holds at most a few rounds of max_in_flight (MEDQ_WORKER__CONCURRENCY
        messages). Waiting on the shared limits (other processes' calls, the windows,
        the adaptive cap) is bounded, as in :meth:`acquire`; a call of this process that
        ends wakes a waiter instead of letting it sleep out its poll."""
        if self._local is None:
            self._local = asyncio.Semaphore(self.config.max_in_flight)
        await self._local.acquire()
        try:
            steps = self._acquiring(est_tokens, lease_s)
            try:
                step = next(steps)
                while True:
                    if isinstance(step, _Wait):
                        await self._wait_for_wake(step.seconds)
                        step = next(steps)
                    else:
                        step = steps.send(await self._batcher.script(ACQUIRE_LUA, list(self.keys), step.args))
            except StopIteration as done:
                lease: Lease = done.value
                return lease
        except BaseException:
            self._local.release()
            raise

    async def arelease(self, lease: Lease, outcome: str, used_tokens: int | None = None, latency: float = 0.0) -> None:
        state, inflight, _, tok = self.keys
        # The batcher sends calls in the order they are made: the next call's acquire,
        # queued after this release, reaches Redis after it. So the local slot is handed
        # on now, not one round trip later.
        try:
            released = self._batcher.script(
                RELEASE_LUA, [state, inflight, tok], self._release_args(lease, outcome, used_tokens, latency)
            )
        finally:
            self._local.release()
            self._wake_one()
        await released

    async def _wait_for_wake(self, seconds: float) -> None:
        """Until a call of this process ends and wakes this one, or the time the gate gave."""
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(woken)
        try:
            await asyncio.wait_for(asyncio.shield(woken), seconds)
        except asyncio.TimeoutError:
            pass
        finally:
            if not woken.done():
                woken.cancel()  # no longer waiting: a wake passes it by

    def _wake_one(self) -> None:
        while self._waiters:
            woken = self._waiters.popleft()
            if not woken.done():
                woken.set_result(None)
                return

    async def acall(self, est_tokens: int, fn: Any, lease_s: float | None = None) -> Any:
        """``await fn()`` under a lease; ``fn`` returns what :meth:`call`'s does."""
        lease = await self.aacquire(est_tokens, lease_s)
        started = time.monotonic()
        try:
            result, used, *work = await fn()
        except BaseException as exc:
            await self.arelease(lease, outcome_of(exc))
            raise
        await self.arelease(lease, OK, used, _latency(started, work))
        return result

    # ------------------------------------------------------------- shared steps

    def _acquiring(self, est_tokens: int, lease_s: float | None) -> Generator[_Ask | _Wait, Any, Lease]:
        """Taking a lease: ask the acquire script until it grants one, waiting as it says
        (:meth:`_decide`). Counts the waits and the rejections (``medq_rate_limit_*``)."""
        lease_id = new_id()
        started = time.monotonic()
        deadline = started + self.config.max_wait_s
        waited_for = ""  # the first limit that made this call wait
        poll_s = 0.005
        while True:
            res = yield _Ask(self._acquire_args(lease_id, est_tokens, lease_s))
            try:
                lease, sleep_s, poll_s = self._decide(res, lease_id, deadline, poll_s)
            except NoCapacity:
                metrics.incr("medq_rate_limit_rejections_total", endpoint=self.url, reason=_s(res[2]))
                raise
            if lease is not None:
                if waited_for:
                    metrics.incr("medq_rate_limit_waits_total", endpoint=self.url, reason=waited_for)
                    metrics.incr("medq_rate_limit_wait_seconds_total", time.monotonic() - started, endpoint=self.url)
                return lease
            waited_for = waited_for or _s(res[2])
            yield _Wait(sleep_s)

    def _acquire_args(self, lease_id: str, est_tokens: int, lease_s: float | None = None) -> list[Any]:
        c = self.config
        return [
            lease_id, int((lease_s or c.lease_s) * 1000), c.max_in_flight, c.min_in_flight,
            c.requests_per_min or 0, c.tokens_per_min or 0, est_tokens,
            BUCKETS, c.start, LEARNED_TTL_S * 1000,
        ]

    def _release_args(self, lease: Lease, outcome: str, used_tokens: int | None, latency: float = 0.0) -> list[Any]:
        c = self.config
        return [
            lease.lease_id, outcome, lease.bucket, lease.est_tokens,
            -1 if used_tokens is None else used_tokens,
            c.max_in_flight, c.min_in_flight, "1" if c.adaptive else "0",
            c.failure_threshold, int(c.cooldown_s * 1000), int(c.cooldown_max_s * 1000),
            BUCKETS, f"{latency:.6g}", LATENCY_TOLERANCE, c.start,
        ]

    def _decide(self, res: Any, lease_id: str, deadline: float, poll_s: float) -> tuple[Lease | None, float, float]:
        """What the acquire script said: a lease, or how long to wait before asking again
        (and the next poll interval). Raises :class:`NoCapacity` when waiting would
        outlast ``max_wait_s``: the job is handed back instead of holding a slot."""
        if int(res[0]) == 1:
            self.refused = Refusals(int(_s(res[4]) or -1), bool(_s(res[5])))
            granted = _granted.get()
            if granted is not None:
                granted.set()
            return Lease(lease_id, int(res[1]), int(res[3]) if self.config.tokens_per_min else 0), 0.0, poll_s
        wait_s, reason = int(res[1]) / 1000, _s(res[2])
        left = deadline - time.monotonic()
        if reason == "in_flight" and self.config.patient:
            left = math.inf  # its place in this endpoint's line is the best it can get
        if reason == "cooling" or wait_s > left or left <= 0:
            retry_after = wait_s if wait_s > 0 else max(poll_s * 10, 0.5)
            raise NoCapacity(f"{self.url}: no capacity ({reason.replace('_', ' ')})", retry_after_s=retry_after)
        if wait_s > 0:
            return None, wait_s + self._jitter(0.05), poll_s  # the window frees a slot then
        # in flight: poll, backing off (a call of this process that ends wakes the next waiter)
        return None, min(poll_s + self._jitter(poll_s), max(left, 0)), min(poll_s * 2, 0.2)

    def learn_refusal(self, *, format_rank: int | None = None, stream: bool = False, company: bool = False) -> None:
        """Tell every worker what this endpoint refused: a response_format (its rank: the
        looser ones stay allowed), streamed answers, or a second request beside a stream
        (it cut the stream: one request at a time from now). Their next lease says so."""
        self._learn(keys=[self.keys[0]], args=self._learn_args(format_rank, stream, company))

    async def alearn_refusal(self, *, format_rank: int | None = None, stream: bool = False,
                             company: bool = False) -> None:
        """:meth:`learn_refusal` through the worker engine's batched Redis."""
        await self._batcher.script(LEARN_LUA, [self.keys[0]], self._learn_args(format_rank, stream, company))

    @staticmethod
    def _learn_args(format_rank: int | None, stream: bool, company: bool) -> list[Any]:
        said = [("fmt", format_rank)] if format_rank is not None else []
        said += [("nostream", 1)] if stream else []
        said += [("serial", 1)] if company else []
        if len(said) != 1:
            raise ValueError("learn_refusal: one refusal at a time")
        what, value = said[0]
        return [what, value, LEARNED_TTL_S * 1000]

    def snapshot(self) -> dict[str, Any]:
        return endpoint_snapshot(self._r, self.url, self.config.start)

    def _jitter(self, scale: float) -> float:
        with self._rng_lock:
            return self._rng.random() * scale


def _latency(started: float, work: list[Any]) -> float:
    """Milliseconds per unit of work of a call that started at ``started``; 0: no signal.
    A call under ``LATENCY_MIN_MS`` gives none: its time is the client's and the network's
    jitter (a millisecond is "twice" half a millisecond), not a queue at the server."""
    units = float(work[0]) if work else 0.0
    elapsed_ms = (time.monotonic() - started) * 1000
    return elapsed_ms / units if units > 0 and elapsed_ms >= LATENCY_MIN_MS else 0.0


def endpoint_snapshot(r: redis.Redis, url: str, max_in_flight: int | None = None) -> dict[str, Any]:
    """What ``medq endpoints`` shows: the live cap, leases in flight, cool-down.
    ``max_in_flight``: the cap shown for an endpoint no call has reached yet (its start)."""
    return endpoint_snapshots(r, [url], max_in_flight)[0]


def endpoint_snapshots(r: redis.Redis, urls: list[str], max_in_flight: int | None = None) -> list[dict[str, Any]]:
    """The snapshots of several endpoints in one round trip."""
    pipe = r.pipeline(transaction=False)
    _queue_snapshots(pipe, urls)
    return _snapshots(urls, pipe.execute(), max_in_flight)


async def aendpoint_snapshots(ar: Any, urls: list[str], max_in_flight: int | None = None) -> list[dict[str, Any]]:
    """:func:`endpoint_snapshots` on an asyncio Redis client."""
    pipe = ar.pipeline(transaction=False)
    _queue_snapshots(pipe, urls)
    return _snapshots(urls, await pipe.execute(), max_in_flight)


def _queue_snapshots(pipe: Any, urls: list[str]) -> None:
    pipe.time()
    for url in urls:
        state, inflight, _, _ = endpoint_keys(url)
        pipe.hgetall(state)
        pipe.zcard(inflight)


def _snapshots(urls: list[str], replies: list[Any], max_in_flight: int | None) -> list[dict[str, Any]]:
    (secs, micros), *rest = replies
    now_ms = secs * 1000 + micros // 1000
    out = []
    for url, raw, n in zip(urls, rest[0::2], rest[1::2], strict=True):
        h = {_s(k): _s(v) for k, v in raw.items()}
        cool_until = float(h.get("cool_until", 0))
        limit = float(h["limit"]) if "limit" in h else float(max_in_flight or 0)
        learned = float(h.get("learned_at", 0)) + LEARNED_TTL_S * 1000 > now_ms  # see learn_refusal
        out.append({
            "url": redact_url(url),
            "in_flight": int(n),
            "limit": round(limit, 2),
            "cooling_s": round(max(cool_until - now_ms, 0) / 1000, 1),
            "ok": int(h.get("ok", 0)),
            "errors": int(h.get("errors", 0)),
            "cuts": int(h.get("cuts", 0)),
            "latency_cuts": int(h.get("latency_cuts", 0)),
            "trips": int(h.get("trips", 0)),
            # what it refused, as every worker knows it: the first N response_formats (in
            # MEDQ_LLM__RESPONSE_FORMAT's auto order), streamed answers, a second request at once
            "formats_refused": int(h["fmt"]) + 1 if learned and "fmt" in h else 0,
            "streams": not (learned and "nostream" in h),
            "one_at_a_time": learned and "serial" in h,
        })
    return out


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)
