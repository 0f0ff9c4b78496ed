"""A job's life in a worker: load by id, extract, store one result, record the state.

    queued -> running -> succeeded
                      -> retrying -> running ...   (retryable errors, with backoff)
                      -> failed                    (permanent error, or a budget spent: dead letter)

Exactly one result per job, whatever the broker does:

- A run takes a *lease* on the job (``lease_until``, renewed by a heartbeat while it
  runs). A second delivery of a job whose lease is live (a visibility-timeout
  redelivery, a duplicate message) does not run it: it is put back until the lease
  ends, and then finds the job finished.
- A job found ``running`` with an expired lease lost its worker (``kill -9``, OOM, a
  host gone). It runs again; after ``MEDQ_WORKER__MAX_LOST_RUNS`` lost runs it is a
  poison job and goes to dead letters instead of killing workers forever. After one
  lost run it runs alone (``worker.isolation``), so another record's deaths are not its.
- The result store keeps the first success: a late second run cannot replace it.

Budgets: charged errors (timeouts, 5xx) count against ``MEDQ_WORKER__MAX_RETRIES``;
back-pressure (busy, down, rate-limited, no capacity) only delays the job, for at most
``MEDQ_WORKER__MAX_WAIT_S``. Dead letters keep their payload until the job succeeds
or the batch is purged, so ``medq requeue`` can run them again.

Only ids and PHI-free summaries leave this module: the note is read from the
payload store, given to the processor, and dropped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import random
import socket
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

import redis
import redis.asyncio

from medq.core.contract import (
    QUEUE, TASK_EXTRACT, WATCH_KEY, JobStatus, batch_key, failed_key, job_key, payload_key, result_key, split_revision,
)
from medq.core.crypto import Sealer, open_text
from medq.core.errors import (
    MedqError,
    NoCapacity,
    PayloadMissing,
    PermanentError,
    RetryableError,
    SchemaVersionUnavailable,
    ServerError,
    StoreUnavailable,
    TimeLimitExceeded,
    WorkerLost,
)
from medq.core.settings import Settings, get_settings
from medq.core.ids import new_id
from worker.pipeline import Batcher
from worker.endpoints import EndpointPool
from worker.isolation import SuspectGate
from medq.state.metrics import FLUSH_S, metrics
from worker.extract.processor import Extraction, MedicalDataProcessor
from medq.state.results import ResultStore, open_store_for
from medq.state.results.redis_store import PUT_LUA, RedisResultStore, reachable
from worker.policy import RetryPolicy, compute_backoff

log = logging.getLogger("medq.worker")

# A store that comes back is written to within this long; MEDQ_WORKER__STORE_WAIT_S bounds the whole wait.
_STORE_RETRY_MAX_S = 30.0

# Start a run: one atomic step that decides whether this delivery may run the job.
START_LUA = """
-- KEYS: job, payload, watch   ARGV: run_id, lease_ms, max_lost_runs, now_iso, job_id,
--   mode: '1' a many-job message; '0' a job alone in its message; '2' the same, holding the process alone
-- Returns {verdict, batch, record_id, schema, schema_version, ...}: one round trip
-- reads the job, decides, takes the lease and fetches the record.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'status', 'lease_until', 'first_run_ms', 'batch', 'record_id', 'schema',
                     'schema_version', 'attempts', 'superseded_by', 'lost')
if not h[1] or not h[4] then return {'missing'} end
if h[9] then
  -- a newer revision of the record replaced this job (medq enqueue --replace): nothing to run
  redis.call('ZREM', KEYS[3], ARGV[5])
  return {'superseded', h[9]}
end
local job = {h[4], h[5] or '', h[6] or '', h[7] or '1'}
local function reply(...)
  local out = {...}
  table.insert(out, 2, job[4]); table.insert(out, 2, job[3]); table.insert(out, 2, job[2]); table.insert(out, 2, job[1])
  return out
end
if h[1] == 'succeeded' or h[1] == 'failed' then return reply('final', h[1], h[8] or '0') end
if h[1] == 'running' then
  local lease_until = tonumber(h[2]) or 0
  if lease_until > now then return reply('busy', tostring(lease_until - now)) end
end
-- a suspect (its worker died: found running with a lapsed lease, or lost before) alone in its
-- message first takes the process for itself (worker.isolation), then comes back in mode '2';
-- nothing is written now, so its lost run is counted once, on that call
if ARGV[6] == '0' and (h[1] == 'running' or (tonumber(h[10]) or 0) > 0) then return reply('gate') end
if h[1] == 'running' then
  local lost = redis.call('HINCRBY', KEYS[1], 'lost', 1)
  h[10] = tostring(lost)
  -- in a shared message the death may have been a companion's: only a job that died alone is poison
  if lost >= tonumber(ARGV[3]) and ARGV[6] ~= '1' then return reply('poison', tostring(lost), h[8] or '0') end
end
if ARGV[6] == '1' and (tonumber(h[10]) or 0) > 0 then
  -- a suspect (a worker died while it ran): not run beside others, so that its next death
  -- is charged to it alone; the message sends it on as its own medq.extract
  redis.call('HSET', KEYS[1], 'status', 'retrying', 'updated_at', ARGV[4])
  redis.call('HDEL', KEYS[1], 'lease_until', 'run_id')
  redis.call('ZADD', KEYS[3], now, ARGV[5])
  return reply('alone', h[10])
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if not h[3] then redis.call('HSET', KEYS[1], 'first_run_ms', now) end
redis.call('HSET', KEYS[1], 'status', 'running', 'lease_until', now + tonumber(ARGV[2]),
           'run_id', ARGV[1], 'updated_at', ARGV[4])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[5])
local f = redis.call('HMGET', KEYS[1], 'failures', 'lost', 'first_run_ms', 'deferrals', 'unsent_runs')
return reply('run', tostring(attempts), f[1] or '0', f[2] or '0', f[3], f[4] or '0', tostring(now), f[5] or '0',
             redis.call('GET', KEYS[2]) or false)
"""

# A job succeeded: final state, no dead letter, state expires with results, note gone.
# A revision's first job (the record's pointer to it) expires with it; a replaced job keeps
# the expiry it was given when replaced (a first job's lives as long as its newest revision).
# Returns 0, writing nothing, for a job no longer there: purged while it ran (see RETRY_LUA).
FINISH_LUA = """
-- KEYS: job, failed, batch, payload, watch, [first job of this revision]   ARGV: now_iso, results_ttl_s, job_id
local live = redis.call('HMGET', KEYS[1], 'status', 'batch')
if not live[1] or not live[2] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'succeeded', 'updated_at', ARGV[1])
redis.call('HDEL', KEYS[1], 'error_kind', 'error_message', 'lease_until', 'run_id')
redis.call('ZREM', KEYS[2], ARGV[3])
if redis.call('HEXISTS', KEYS[1], 'superseded_by') == 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if KEYS[6] and redis.call('HGET', KEYS[6], 'superseded_by') == ARGV[3] then redis.call('EXPIRE', KEYS[6], ARGV[2]) end
redis.call('EXPIRE', KEYS[3], ARGV[2])
redis.call('DEL', KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[3])
return 1
"""

# Why every write of a run's end checks that its job is still there: ``medq purge``
# deletes the job hash while runs are in flight, and a hash of an unfinished job never
# expires, so a missing one (no status or no batch, as START_LUA reads it) was purged.
# Writing to it would bring back a job state, a dead letter or a result the user erased.

# A run will be tried again later: count it, watch for its return, say why.
RETRY_LUA = """
-- KEYS: job, watch   ARGV: counter ('failures' or 'deferrals'), due_ms, job_id, error_kind, error_message, now_iso,
--                         unsent ('1': the run sent nothing to the model)
-- Returns 0, writing nothing, for a job no longer there (purged while it ran).
local live = redis.call('HMGET', KEYS[1], 'status', 'batch')
if not live[1] or not live[2] then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
if ARGV[7] == '1' then
  -- START_LUA counted the run as an attempt; it was a delivery only (see JobRunner._retry_later)
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)
  redis.call('HINCRBY', KEYS[1], 'unsent_runs', 1)
end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[1], 'status', 'retrying', 'error_kind', ARGV[4], 'error_message', ARGV[5], 'updated_at', ARGV[6])
return 1
"""

# A dead letter: listed in the batch's failed set, its state and payload kept (no expiry)
# until it succeeds on a requeue or the batch is purged.
FAIL_LUA = """
-- KEYS: job, failed, watch, payload, batch   ARGV: error_kind, error_message, now_iso, job_id, failed_at_s
-- Returns 0, writing nothing, for a job no longer there (purged while it ran).
local live = redis.call('HMGET', KEYS[1], 'status', 'batch')
if not live[1] or not live[2] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'failed', 'error_kind', ARGV[1], 'error_message', ARGV[2], 'updated_at', ARGV[3])
redis.call('HDEL', KEYS[1], 'lease_until', 'run_id')
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
redis.call('ZREM', KEYS[3], ARGV[4])
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[4])
redis.call('PERSIST', KEYS[5])
return 1
"""

# A job's runs that sent nothing to the model: its deliveries are its attempts and these.
UNSENT_LUA = """
-- KEYS: job
return redis.call('HGET', KEYS[1], 'unsent_runs')
"""

# Renew a lease, only if this run still holds it (so never on a purged job).
RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'run_id', 'status')
if h[1] == ARGV[1] and h[2] == 'running' then
  redis.call('HSET', KEYS[1], 'lease_until', now + tonumber(ARGV[2]))
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
  return 1
end
return 0
"""


# Claim the started jobs nothing has touched for `grace`: a lost message, a worker gone
# with it. Claimed ones are pushed a grace ahead, so one worker re-sends each.
CLAIM_LUA = """
-- KEYS: watch   ARGV: grace_ms, limit
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]), 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], now, id) end
return ids
"""


T = TypeVar("T")

class _NeedsGate:
    """_run's answer for a suspect alone in its message: run it again once it has the process alone."""


@dataclass(frozen=True)
class RetryLater:
    countdown_s: float
    error: RetryableError


@dataclass(frozen=True)
class Job:
    job_id: str
    batch: str
    record_id: str
    schema: str
    schema_version: int


@dataclass(frozen=True)
class Run:
    """This delivery's run of a job: what START_LUA handed out."""

    run_id: str
    attempts: int
    failures: int
    lost: int
    deferrals: int
    waited_s: float
    unsent_runs: int  # earlier runs put back before any request: deliveries = attempts + these
    raw_payload: str | None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class JobRunner:
    """Runs jobs on one asyncio loop (the process's :class:`Engine`): every job of the
    process shares one async Redis client, one HTTP connection pool per endpoint and
    one lease heartbeat. Make it, and call it, inside that loop."""

    def __init__(
        self,
        settings: Settings,
        processor: MedicalDataProcessor | None = None,
        store: ResultStore | None = None,
    ) -> None:
        self.settings = settings
        self.r = redis.asyncio.Redis.from_url(settings.redis_url, decode_responses=True)
        self.batch = Batcher(self.r)  # the per-job calls of all running jobs, pipelined
        self.sealer = Sealer.from_settings(settings)  # MEDQ_ENCRYPTION_KEY: payloads and results at rest
        self.store = store or open_store_for(settings)
        # results in the job-state Redis: stored through the same pipelines
        self._put_batched = isinstance(self.store, RedisResultStore) and settings.effective_results_url == settings.redis_url
        self.pool = EndpointPool.from_settings(
            settings, redis.Redis.from_url(settings.redis_url, decode_responses=True), processor, batcher=self.batch
        )
        w = settings.worker
        self.policy = RetryPolicy(w.max_retries, w.retry_backoff_s, w.retry_backoff_max_s)
        self.lease_ms = int(w.lease_s * 1000)
        self._renew = self.r.register_script(RENEW_LUA)
        self._claim = self.r.register_script(CLAIM_LUA)
        # A started job is touched again within its lease (renewed while it runs), its
        # countdown (a retry) or the visibility timeout (a message of a killed worker
        # comes back): one untouched for longer has lost its message.
        self.orphan_grace_s = settings.visibility_timeout_s + settings.max_countdown_s + w.lease_s + 5
        self._active: dict[str, str] = {}  # job id -> run id, renewed by the heartbeat
        self.gate = SuspectGate()  # a job whose worker died runs alone in the process
        self._heartbeat: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._who = f"{socket.gethostname()}:{os.getpid()}"

    @property
    def processor(self) -> MedicalDataProcessor:
        return self.pool.primary.processor

    async def run_many(self, job_ids: list[str]) -> list[dict[str, Any] | RetryLater | BaseException]:
        """Run jobs side by side; each one's outcome, or the exception it raised."""
        shared = len(job_ids) > 1
        return await asyncio.gather(*(self.run(j, shared) for j in job_ids), return_exceptions=True)

    async def run(self, job_id: str, shared: bool = False) -> dict[str, Any] | RetryLater:
        """Run a job once. Returns its summary, or ``RetryLater``; raises ``PermanentError``
        after recording the failure, so Celery and Flower show it as failed. ``shared``: the
        job came in a message of several; one whose worker died before is then not run
        (``worker.isolation``), and alone it runs with no other job in this process.

        START_LUA tells a suspect apart in the same round trip that starts a job, so only a
        suspect pays a second call (after it has the process to itself)."""
        async with self.gate.turn(False):
            outcome = await self._run(job_id, "1" if shared else "0")
        if not isinstance(outcome, _NeedsGate):
            return outcome
        async with self.gate.turn(True):
            outcome = await self._run(job_id, "2")
        assert not isinstance(outcome, _NeedsGate)  # mode 2 never asks for the gate
        return outcome

    async def _run(self, job_id: str, mode: str) -> dict[str, Any] | RetryLater | _NeedsGate:
        run_id = new_id()
        res = await self.batch.script(
            START_LUA,
            [job_key(job_id), payload_key(job_id), WATCH_KEY],
            [run_id, self.lease_ms, self.settings.worker.max_lost_runs, _now(), job_id, mode],
        )
        verdict = res[0]
        if verdict == "missing":
            # Nothing to record the failure in: the job was purged or never written.
            log.warning("job %s: no job state in Redis (purged, expired or foreign); dropped", job_id)
            return {"job_id": job_id, "status": "unknown"}
        if verdict == "superseded":
            log.info("job %s: replaced by job %s (a corrected record); dropped", job_id, res[1])
            return {"job_id": job_id, "status": "superseded", "superseded_by": res[1]}
        job = Job(job_id, batch=res[1], record_id=res[2], schema=res[3], schema_version=int(res[4]))
        res = [verdict, *res[5:]]
        if verdict == "final":
            # Redelivered after it finished (worker lost before the ack): one result only.
            return self._summary(job, JobStatus(res[1]), int(res[2]))
        if verdict == "busy":
            # Another delivery runs it now; come back when its lease would have run out.
            wait_s = min(int(res[1]) / 1000 + 1, self.settings.max_countdown_s)
            log.info("job %s: already running elsewhere; checking again in %.1fs", job_id, wait_s)
            return RetryLater(wait_s, RetryableError(f"job {job_id} is running in another worker"))
        if verdict == "gate":
            return _NeedsGate()
        if verdict == "alone":
            # A worker died while it ran (with companions, so nobody knows whose record killed
            # it): it goes on as a message of its own (what the message does with RetryLater),
            # so that a poison record takes down only itself and is charged alone.
            log.warning("job %s record %s: a worker died during %s run(s) of it; sent on to run alone",
                        job_id, job.record_id, res[1])
            return RetryLater(0.0, RetryableError(f"job {job_id} lost a worker before; runs in a message of its own"))
        if verdict == "poison":
            lost, attempts = int(res[1]), int(res[2])
            exc = WorkerLost(
                f"record {job.record_id}: its worker died during {lost} runs (MEDQ_WORKER__MAX_LOST_RUNS); not run again"
            )
            await self._fail(job, attempts, exc)
            raise exc
        run = Run(
            run_id=run_id,
            attempts=int(res[1]),
            failures=int(res[2]),
            lost=int(res[3]),
            deferrals=int(res[5]),
            waited_s=(int(res[6]) - int(res[4])) / 1000,
            unsent_runs=int(res[7]),
            raw_payload=res[8] if len(res) > 8 else None,
        )
        self._hold(job_id, run_id)
        try:
            return await self._execute(job, run)
        finally:
            self._active.pop(job_id, None)

    async def _execute(self, job: Job, run: Run) -> dict[str, Any] | RetryLater:
        if run.lost and await self._already_stored(job):
            # The last run stored its result and died before saying so: finish, do not redo.
            await self._mark_succeeded(job)
            return self._summary(job, JobStatus.SUCCEEDED, run.attempts)
        limit_s = self.settings.worker.task_time_limit_s
        try:
            text, metadata = self._load_payload(job, run.raw_payload)
            # The engine enforces the time limit itself (Celery's threads pool cannot):
            # the extraction is cancelled, its endpoint slot given back, the job retried.
            extraction = await asyncio.wait_for(self._extract(job, text), limit_s)
        except asyncio.TimeoutError:
            return await self._retry_later(job, run, TimeLimitExceeded(
                f"record {job.record_id}: extraction ran past MEDQ_WORKER__TASK_TIME_LIMIT_S={limit_s}s"
            ))
        except RetryableError as exc:
            return await self._retry_later(job, run, exc)
        except PermanentError as exc:
            await self._fail(job, run.attempts, exc)
            raise
        except redis.RedisError:
            raise  # the task puts the message back; the lease lapses and the job runs again
        except Exception as exc:  # a bug: charged like a 5xx, never with its message (it may quote data)
            where = traceback.extract_tb(exc.__traceback__)[-1]
            log.error("job %s: internal error %s at %s:%s", job.job_id, type(exc).__name__, where.filename, where.lineno)
            return await self._retry_later(
                job, run, ServerError(f"internal error in medq ({type(exc).__name__}); see the worker log")
            )
        if not await self._succeed(job, run, extraction, metadata):
            return self._summary(job, JobStatus.FAILED, run.attempts)  # the store stayed away: a dead letter
        return self._summary(job, JobStatus.SUCCEEDED, run.attempts, extraction.provenance.latency_ms)

    async def _extract(self, job: Job, text: str) -> Extraction:
        """The first endpoint that answers; endpoint errors fail over to the next."""
        # The version the job was enqueued under, never another one (SchemaVersionUnavailable
        # puts it back for a worker that has it): the result says the version that produced it.
        sch = self.processor.schema_loader.get(job.schema, job.schema_version)
        last: RetryableError | None = None
        for endpoint in await self.pool.aorder():
            try:
                return await endpoint.processor.aprocess(text, sch, record_id=job.record_id)
            except RetryableError as exc:
                if last is not None and isinstance(exc, NoCapacity) and not isinstance(last, NoCapacity):
                    continue  # keep the more telling error
                last = exc
                if len(self.pool.endpoints) > 1:
                    log.info("job %s: %s from %s; trying the next endpoint", job.job_id, exc.kind, endpoint.url)
        assert last is not None
        raise last

    async def _retry_later(self, job: Job, run: Run, exc: RetryableError) -> RetryLater:
        w = self.settings.worker
        # Put back by medq's own limits (or for a schema version not loaded here) before any
        # request: a delivery, not an attempt. ``attempts`` counts the runs that reached the
        # model, so a job deferred 300 times for capacity still says how often it was asked.
        unsent = isinstance(exc, (NoCapacity, SchemaVersionUnavailable))
        attempts = run.attempts - 1 if unsent else run.attempts
        give_up: str | None = None
        if exc.charged:
            counter = "failures"
            n = run.failures + 1
            if n > w.max_retries:
                give_up = f"gave up after {n} failed attempts (MEDQ_WORKER__MAX_RETRIES={w.max_retries})"
            countdown_s = compute_backoff(n - 1, self.policy, exc.retry_after_s)
        else:
            counter = "deferrals"
            if run.waited_s > w.max_wait_s:
                give_up = f"gave up after waiting {run.waited_s:.0f}s (MEDQ_WORKER__MAX_WAIT_S)"
            if isinstance(exc, NoCapacity) and exc.retry_after_s is not None:
                # The gate knows when there is room again: come back then, spread over a second.
                countdown_s = exc.retry_after_s + random.random()
            else:
                countdown_s = compute_backoff(min(run.deferrals, 16), self.policy, exc.retry_after_s)
        countdown_s = min(countdown_s, self.settings.max_countdown_s)
        due_ms = time.time() * 1000 + countdown_s * 1000
        # Counted first, also when giving up, so the dead letter's attempts are the runs that reached the model.
        live = await self.batch.script(RETRY_LUA, [job_key(job.job_id), WATCH_KEY],
                                       [counter, due_ms, job.job_id, exc.kind, exc.message, _now(), int(unsent)])
        if give_up is not None:
            await self._give_up(job, attempts, exc, give_up)
        metrics.incr("medq_jobs_total", schema=job.schema, outcome="retried")
        metrics.incr("medq_retries_total", schema=job.schema, kind=exc.kind)
        if not live:
            log.info("job %s: purged while it ran; its state stays gone", job.job_id)
            return RetryLater(countdown_s, exc)  # the message comes back to nothing and is dropped
        log.info("job %s record %s: %s; retry in %.1fs", job.job_id, job.record_id, exc.kind, countdown_s)
        return RetryLater(countdown_s, exc)

    async def _give_up(self, job: Job, attempts: int, exc: RetryableError, why: str) -> None:
        gave_up = type(exc)(f"{exc.message} ({why})", exc.retry_after_s)
        await self._fail(job, attempts, gave_up)
        raise gave_up from None

    async def _already_stored(self, job: Job) -> bool:
        try:
            doc = await self._while_store_away(job.job_id, lambda: asyncio.to_thread(self.store.get, job.job_id))
        except StoreUnavailable:
            return False  # cannot tell: run it; the first success stays the one kept
        return bool(doc and doc.get("status") == JobStatus.SUCCEEDED.value)

    async def _put(self, doc: dict[str, Any]) -> bool:
        """Store a result; True if written (False: a success was already stored). A store
        away is back-pressure: the answer is held and written again (see
        :meth:`_while_store_away`); raises ``StoreUnavailable`` once MEDQ_WORKER__STORE_WAIT_S passes."""
        return await self._while_store_away(doc["job_id"], lambda: self._put_once(doc))

    async def _put_once(self, doc: dict[str, Any]) -> bool:
        """Store a result: on this loop for the Redis store, in a thread for the others."""
        if isinstance(self.store, RedisResultStore) and self._put_batched:
            value = self.store.encode(doc)  # the store's own encoding (sealed with its key)
            # with the job key: no result for a job purged while it ran
            keys = [result_key(doc["job_id"]), job_key(doc["job_id"])]
            with reachable():
                return bool(await self.batch.script(PUT_LUA, keys, [value, self.settings.results_ttl_s]))
        aput = getattr(self.store, "aput", None)
        if aput is not None:
            return bool(await aput(doc))
        return bool(await asyncio.to_thread(self.store.put, doc))

    async def _while_store_away(self, job_id: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call`` the results store until it answers, with backoff, for MEDQ_WORKER__STORE_WAIT_S
        at most. Meanwhile the job keeps its lease (the heartbeat renews it; the store is not
        Redis's job state), so no other delivery runs it and the model is not asked again, and
        nothing is charged: the store being away is not the record's doing."""
        wait_s = self.settings.worker.store_wait_s
        deadline = time.monotonic() + wait_s
        tries = 0
        while True:
            try:
                out = await call()
            except StoreUnavailable as exc:
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    raise StoreUnavailable(
                        f"{exc.message} for {wait_s:.0f}s (MEDQ_WORKER__STORE_WAIT_S); the result was not stored"
                    ) from None
                if tries == 0:
                    log.warning("job %s: result store unavailable (%s); holding the answer, writing again for up to %.0fs",
                                job_id, exc.message, wait_s)
                    metrics.incr("medq_store_waits_total")
                await asyncio.sleep(min(compute_backoff(tries, self.policy), _STORE_RETRY_MAX_S, left_s))
                tries += 1
                continue
            if tries:
                log.info("job %s: result store answered again after %d tries", job_id, tries + 1)
            return out

    def _load_payload(self, job: Job, raw: str | None) -> tuple[str, dict[str, Any]]:
        if raw is None:
            raise PayloadMissing(
                f"record {job.record_id}: stored record is gone (expired after MEDQ_PAYLOAD_TTL_S or purged); enqueue it again under a new --batch"
            )
        payload = json.loads(open_text(raw, self.sealer, f"the stored record {job.record_id}"))
        return payload["text"], payload.get("metadata") or {}

    async def _deliveries(self, job: Job, attempts: int) -> int:
        """The job's runs: those that reached the model (``attempts``) and those put back before."""
        return attempts + int(await self.batch.script(UNSENT_LUA, [job_key(job.job_id)], []) or 0)

    def _doc(self, job: Job, status: JobStatus, attempts: int, deliveries: int) -> dict[str, Any]:
        return {
            "id": job.record_id,
            "job_id": job.job_id,
            "batch": job.batch,
            "schema": job.schema,
            "schema_version": job.schema_version,
            "status": status.value,
            "data": None,
            "error": None,
            "model": self.processor.model,
            "endpoint": self.processor.base_url,
            "attempts": attempts,
            "deliveries": deliveries,
            "usage": None,
            "latency_ms": None,
            "metadata": {},
            "evidence": None,
            "provenance": None,
            "finished_at": _now(),
        }

    async def _succeed(self, job: Job, run: Run, ex: Extraction, metadata: dict[str, Any]) -> bool:
        """Store the result and finish the job. False if the store stayed away past
        MEDQ_WORKER__STORE_WAIT_S: the job is then a dead letter of kind store_unavailable."""
        prov = ex.provenance
        # START_LUA handed out the counts: no round trip for them on the way out
        attempts = run.attempts
        doc = self._doc(job, JobStatus.SUCCEEDED, attempts, attempts + run.unsent_runs)
        doc.update(
            data=ex.data_dict(),
            schema_version=ex.schema.version,
            model=prov.model,
            endpoint=prov.endpoint,
            usage=prov.usage,
            latency_ms=round(prov.latency_ms, 1),
            metadata=metadata,
            evidence=ex.evidence,
            provenance=prov.as_dict(),
        )
        try:
            written = await self._put(doc)
        except StoreUnavailable as exc:
            await self._fail(job, attempts, exc, store_result=False)
            return False
        if not written:
            log.info("job %s: a result was already stored; kept the first", job.job_id)
        metrics.incr("medq_jobs_total", schema=job.schema, outcome="succeeded")
        if prov.reasks:
            metrics.incr("medq_reasks_total", prov.reasks, schema=job.schema)
        if prov.truncations:
            metrics.incr("medq_truncations_total", prov.truncations, schema=job.schema)
        await self._mark_succeeded(job)
        return True

    async def _mark_succeeded(self, job: Job) -> None:
        # The state lives as long as results do, then goes with its batch; the note is not
        # needed once its result is stored: shorter life, smaller exposure.
        keys = [job_key(job.job_id), failed_key(job.batch), batch_key(job.batch), payload_key(job.job_id), WATCH_KEY]
        first, revision = split_revision(job.job_id)
        if revision:
            keys.append(job_key(first))
        if not await self.batch.script(FINISH_LUA, keys, [_now(), self.settings.results_ttl_s, job.job_id]):
            await self._forget_purged(job)

    async def _forget_purged(self, job: Job) -> None:
        """The job's batch was purged while it ran: take back the result this run stored
        before or after the purge. (The Redis store beside the job states refuses a put
        after it, PUT_LUA; PostgreSQL or another Redis cannot see the purge when writing.)"""
        log.info("job %s: purged while it ran; no state or result kept", job.job_id)
        await asyncio.to_thread(self.store.delete, [job.job_id])

    async def _fail(self, job: Job, attempts: int, exc: MedqError, store_result: bool = True) -> None:
        """Make the job a dead letter. Its document goes to the results store too, held while
        the store is away (``_put``); if it stays away, the job state alone says why
        (``medq failed`` and ``medq results`` read it)."""
        metrics.incr("medq_jobs_total", schema=job.schema, outcome="failed")
        metrics.incr("medq_dead_letters_total", schema=job.schema, kind=exc.kind)
        doc = self._doc(job, JobStatus.FAILED, attempts, await self._deliveries(job, attempts))
        doc["error"] = {"kind": exc.kind, "message": exc.message}
        if store_result:
            try:
                await self._put(doc)
            except StoreUnavailable as away:
                log.warning("job %s: its failure was not stored (%s); the job state keeps it", job.job_id, away.kind)
        # A dead letter, unless the batch was purged while the job ran (FAIL_LUA).
        keys = [job_key(job.job_id), failed_key(job.batch), WATCH_KEY, payload_key(job.job_id), batch_key(job.batch)]
        if not await self.batch.script(FAIL_LUA, keys, [exc.kind, exc.message, _now(), job.job_id, time.time()]):
            await self._forget_purged(job)
            return
        log.warning("job %s record %s failed: %s", job.job_id, job.record_id, exc.kind)

    @staticmethod
    def _summary(job: Job, status: JobStatus, attempts: int, latency_ms: float | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"job_id": job.job_id, "status": status.value, "attempts": attempts}
        if latency_ms is not None:
            out["latency_ms"] = round(latency_ms, 1)
        return out

    # ------------------------------------------------------------ orphans

    async def sweep_orphans(self) -> int:
        """Send again the started jobs whose message is gone (never silently dropped).
        Returns how many. A second message for a job is harmless: the lease and the final
        state keep it from running twice."""
        ids = await self._claim(keys=[WATCH_KEY], args=[int(self.orphan_grace_s * 1000), 500])
        if not ids:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(job_key(job_id), "status")
        statuses = await pipe.execute()
        live = [j for j, s in zip(ids, statuses) if s in (JobStatus.RUNNING.value, JobStatus.RETRYING.value)]
        done = [j for j, s in zip(ids, statuses) if s not in (JobStatus.RUNNING.value, JobStatus.RETRYING.value)]
        if done:
            await self.r.zrem(WATCH_KEY, *done)
        if live:
            await asyncio.to_thread(_send_again, live)
            metrics.incr("medq_orphans_resent_total", len(live))
            log.warning("%d started job(s) untouched for %.0fs (message lost with a worker?); sent again: %s",
                        len(live), self.orphan_grace_s, ", ".join(live[:10]))
        return len(live)

    async def sweep_forever(self) -> None:
        period = min(60.0, max(1.0, self.orphan_grace_s / 4))
        while True:
            await asyncio.sleep(period * (0.5 + random.random()))  # workers spread out
            try:
                await self.sweep_orphans()
            except redis.RedisError as exc:
                log.warning("orphan sweep: %s", type(exc).__name__)

    # ------------------------------------------------------------ leases

    def _hold(self, job_id: str, run_id: str) -> None:
        self._active[job_id] = run_id
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_metrics())

    async def _flush_metrics(self) -> None:
        """Add this process's counts to the shared ones (``medq metrics`` serves them)."""
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                await metrics.flush(self.r, self._who, len(self._active))
            except redis.RedisError as exc:
                log.warning("metrics flush: %s", type(exc).__name__)

    async def _beat(self) -> None:
        """Renew the leases of the jobs this process runs, every third of a lease."""
        period = self.lease_ms / 3000
        while True:
            await asyncio.sleep(period)
            held = list(self._active.items())
            if not held:
                continue
            try:
                pipe = self.r.pipeline(transaction=False)
                for job_id, run_id in held:
                    await self._renew(keys=[job_key(job_id), WATCH_KEY], args=[run_id, self.lease_ms, job_id], client=pipe)
                await pipe.execute()
            except redis.RedisError as exc:
                log.warning("lease heartbeat: %s", type(exc).__name__)


class Engine:
    """The worker process's asyncio loop, in a thread of its own, with its one
    :class:`JobRunner`. Celery's pool threads hand it jobs and wait for the outcome,
    so a process keeps as many requests in flight as the endpoints allow, not one per
    pool thread, and every job shares one Redis client and one HTTP pool."""

    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="medq-engine", daemon=True)
        self._thread.start()
        self.runner: JobRunner = self.call(self._make_runner(settings))
        self._sweeper = asyncio.run_coroutine_threadsafe(self.runner.sweep_forever(), self.loop)

    @staticmethod
    async def _make_runner(settings: Settings) -> JobRunner:
        runner = JobRunner(settings)
        # From the start, not at the first job: an idle worker is seen too (``medq api``'s /healthz).
        runner._flusher = asyncio.get_running_loop().create_task(runner._flush_metrics())
        return runner

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` on the engine's loop and wait for its result (from another thread)."""
        future: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result()

    def run(self, job_id: str) -> dict[str, Any] | RetryLater:
        result: dict[str, Any] | RetryLater = self.call(self.runner.run(job_id))
        return result

    def run_many(self, job_ids: list[str]) -> list[dict[str, Any] | RetryLater | BaseException]:
        result: list[dict[str, Any] | RetryLater | BaseException] = self.call(self.runner.run_many(job_ids))
        return result


def _send_again(job_ids: list[str]) -> None:
    from worker.celery_app import app

    for job_id in job_ids:
        app.send_task(TASK_EXTRACT, args=[job_id], task_id=job_id, queue=QUEUE)


_engine: Engine | None = None
_engine_pid: int | None = None
_lock = threading.Lock()


def get_engine() -> Engine:
    """The process's engine: made once per process (a forked child makes its own)."""
    global _engine, _engine_pid
    if _engine is None or _engine_pid != os.getpid():
        with _lock:
            if _engine is None or _engine_pid != os.getpid():
                _engine = Engine(get_settings())
                _engine_pid = os.getpid()
    return _engine
