"""The job hash (``job_key``) and its sets: the one owner of their reads and writes.

- Creating jobs (the producer's): one Lua script per record (CREATE_JOB_LUA), so a
  crash leaves no half a job; then marking their messages sent.
- What a batch is doing: counts per state, dead letters, running jobs again, purging.
- A run's steps (the worker's, ``worker.runner``): start, finish, retry or defer, fail,
  renew the lease, claim the orphans. Each is one Lua script, atomic on its own, so
  two deliveries of a job, a purge and a heartbeat can meet in any order:

    queued -> running -> succeeded
                      -> retrying -> running ...   (retryable errors, with backoff)
                      -> failed                    (permanent error, or a budget spent: dead letter)

Field names come from ``medq.core.contract.JobField``; in the Lua below ``$status``
is the field ``'status'`` (``_lua``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import IntEnum
from string import Template
from typing import Any, Protocol

import redis
import redis.asyncio

from medq.core.contract import (
    JOB_FIELDS,
    WATCH_KEY,
    JobField,
    JobStatus,
    batch_key,
    failed_key,
    job_key,
    make_job_id,
    owner_key,
    payload_key,
    result_key,
    revision_job_id,
    split_revision,
)
from medq.core.errors import EndpointMisconfigured, RetryableError, SchemaUnavailable, UnknownSchema
from medq.state import fleet

_CHUNK = 1000
_FIELDS = (JobField.RECORD_ID, JobField.STATUS, JobField.ATTEMPTS, JobField.ERROR_KIND, JobField.ERROR_MESSAGE,
           JobField.SCHEMA, JobField.SCHEMA_VERSION, JobField.UPDATED_AT, JobField.BATCH, JobField.SEQ,
           JobField.SUPERSEDED_BY, JobField.UNSENT_RUNS)

# Error kinds that a later run may not hit again (the endpoint was down, slow, busy).
TRANSIENT_KINDS: frozenset[str] = frozenset(
    cls.kind for cls in (RetryableError, *RetryableError.__subclasses__())  # type: ignore[attr-defined]
)
# Permanent for the job as it ran, but the endpoint's doing (a model it does not serve, a
# context too small for the note): once the server or the settings are fixed, they run.
ENDPOINT_FIX_KINDS: frozenset[str] = frozenset(
    cls.kind for cls in (EndpointMisconfigured, *EndpointMisconfigured.__subclasses__())  # type: ignore[attr-defined]
)
# What plain `medq requeue` takes.
REQUEUE_KINDS: frozenset[str] = TRANSIENT_KINDS | ENDPOINT_FIX_KINDS
# No worker had the job's schema version (``unknown_schema``: a dead letter of a worker from
# before the fleet said its schemas): plain `medq requeue` takes them once a live worker has
# that version loaded (``medq.state.fleet``), and says which still wait for one.
FLEET_KINDS: frozenset[str] = frozenset({SchemaUnavailable.kind, UnknownSchema.kind})


@dataclass(frozen=True)
class JobState:
    job_id: str
    record_id: str
    status: str
    attempts: int  # runs that reached the model (a request sent)
    error_kind: str | None
    error_message: str | None
    schema: str
    schema_version: int
    updated_at: str | None
    batch: str
    seq: int
    deliveries: int = 0  # runs of the job: its attempts and those put back before any request (no capacity)

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def job_ids(r: redis.Redis, batch: str) -> list[str]:
    return [_s(x) for x in r.smembers(batch_key(batch))]


def iter_states(r: redis.Redis, batch: str, ids: list[str] | None = None) -> Iterator[JobState]:
    """Every job's state in the batch (or those of ``ids``), in input order (pipelined reads in chunks)."""
    states: list[JobState] = []
    ids = job_ids(r, batch) if ids is None else ids
    for i in range(0, len(ids), _CHUNK):
        chunk = ids[i : i + _CHUNK]
        pipe = r.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hmget(job_key(job_id), _FIELDS)
        for job_id, vals in zip(chunk, pipe.execute(), strict=True):
            v = [_s(x) if x is not None else None for x in vals]
            if v[1] is None:
                continue  # state expired or purged
            if v[10] is not None:
                continue  # replaced by a newer revision of its record; a late run of it is no part of the batch
            states.append(JobState(
                job_id=job_id,
                record_id=v[0] or "",
                status=v[1],
                attempts=int(v[2] or 0),
                error_kind=v[3],
                error_message=v[4],
                schema=v[5] or "",
                schema_version=int(v[6] or 1),
                updated_at=v[7],
                batch=v[8] or batch,
                seq=int(v[9] or 0),
                deliveries=int(v[2] or 0) + int(v[11] or 0),
            ))
    states.sort(key=lambda st: st.seq)
    yield from states


def counts(r: redis.Redis, batch: str) -> Counter[str]:
    """Jobs per state; every state is present, zero or not."""
    c: Counter[str] = Counter({s.value: 0 for s in JobStatus})
    for st in iter_states(r, batch):
        c[st.status] += 1
    return c


def failed(r: redis.Redis, batch: str) -> list[JobState]:
    """The batch's dead letters, from its failed set (no scan of the whole batch)."""
    ids = [_s(x) for x in r.zrange(failed_key(batch), 0, -1)]
    return [st for st in iter_states(r, batch, ids) if st.status == JobStatus.FAILED.value]


@dataclass
class RequeueReport:
    requeued: list[str]
    payload_missing: list[str]  # record ids that cannot run again: their record expired
    # (schema, version) -> jobs not requeued: no live worker has that version loaded (FLEET_KINDS)
    no_worker: dict[tuple[str, int], int] = field(default_factory=dict)


def requeue(producer: Any, batch: str, all_failed: bool = False) -> RequeueReport:
    """Send failed jobs again: by default those whose error was transient or the
    endpoint's set-up (``REQUEUE_KINDS``), and those that no worker had the schema version
    of (``FLEET_KINDS``) once a live worker has it; with ``all_failed`` every failed job. A
    job whose stored record is gone is reported, and so are those still waiting for a
    worker with their schema version (``no_worker``). A job whose worker died while it ran
    goes in a message of its own: if its record kills workers, it takes no companions down."""
    r = producer.r
    chosen = []
    live: dict[str, Counter[int]] = {}
    no_worker: Counter[tuple[str, int]] = Counter()
    for st in failed(r, batch):
        if not all_failed and st.error_kind in FLEET_KINDS:
            if st.schema not in live:
                live[st.schema] = fleet.live_versions_sync(r, st.schema)
            if not live[st.schema][st.schema_version]:
                no_worker[(st.schema, st.schema_version)] += 1
                continue
        elif not all_failed and st.error_kind not in REQUEUE_KINDS:
            continue
        chosen.append(st)
    pipe = r.pipeline(transaction=False)
    for st in chosen:
        pipe.exists(payload_key(st.job_id))
        pipe.hget(job_key(st.job_id), JobField.LOST)
    out = pipe.execute() if chosen else []
    present, lost = out[0::2], out[1::2]
    suspects = {st.job_id for st, n in zip(chosen, lost, strict=True) if int(n or 0) > 0}
    ready = [st for st, ok in zip(chosen, present, strict=True) if ok]
    missing = [st.record_id for st, ok in zip(chosen, present, strict=True) if not ok]
    pipe = r.pipeline(transaction=False)
    for st in ready:
        pipe.hset(job_key(st.job_id), mapping={JobField.STATUS: JobStatus.QUEUED.value})
        # A fresh budget: failures, lost runs and waiting start again from zero.
        pipe.hdel(job_key(st.job_id), JobField.SENT, JobField.FAILURES, JobField.LOST, JobField.SPARED,
                  JobField.RESENT, JobField.DEFERRALS, JobField.FIRST_RUN_MS, JobField.LEASE_UNTIL, JobField.RUN_ID, JobField.RUN_MODE)
        pipe.persist(job_key(st.job_id))  # finished jobs' state expires; a queued one's must not
        pipe.zrem(failed_key(batch), st.job_id)
    pipe.execute()
    producer.send([st.job_id for st in ready if st.job_id not in suspects])
    for st in ready:
        if st.job_id in suspects:
            producer.send([st.job_id])  # one job: a medq.extract message of its own
    return RequeueReport([st.job_id for st in ready], missing, dict(no_worker))


@dataclass
class PurgeReport:
    jobs: int
    payloads: int
    results: int
    job_ids: list[str] = field(default_factory=list)  # every job purged, replaced revisions too


def purge(r: redis.Redis, batch: str, results: bool = False) -> PurgeReport:
    """Delete a batch from Redis: its records (payloads), job states, sets, and with
    ``results`` its results kept in Redis. Running jobs find their state gone and write
    nothing back (FINISH_LUA below and its siblings): a purged job stays purged."""
    ids = job_ids(r, batch) or [_s(x) for x in r.zrange(failed_key(batch), 0, -1)]
    purged = list(ids)
    jobs = payloads = res = 0
    for i in range(0, len(ids), _CHUNK):
        chunk = ids[i : i + _CHUNK]
        pipe = r.pipeline(transaction=False)
        for job_id in chunk:
            pipe.delete(payload_key(job_id))
            pipe.delete(job_key(job_id))
            if results:
                pipe.delete(result_key(job_id))
        out = pipe.execute()
        step = 3 if results else 2
        payloads += sum(out[0::step])
        jobs += sum(out[1::step])
        if results:
            res += sum(out[2::step])
        purged += _purge_replaced(r, chunk, results)
    r.delete(batch_key(batch), failed_key(batch), owner_key(batch))
    return PurgeReport(jobs, payloads, res, purged)


def _purge_replaced(r: redis.Redis, ids: list[str], results: bool) -> list[str]:
    """The jobs that revisions in ``ids`` replaced (``medq enqueue --replace``): no longer in
    the batch set, but their hashes (and results) stay until they expire. Returns their ids."""
    pipe = r.pipeline(transaction=False)
    olds = []
    for job_id in ids:
        first, revision = split_revision(job_id)
        for old in (revision_job_id(first, n) for n in range(revision)):
            olds.append(old)
            pipe.delete(job_key(old), payload_key(old), *([result_key(old)] if results else []))
    if len(pipe):
        pipe.execute()
    return olds


# KEYS[1] owner string, KEYS[2] batch set; ARGV[1] client.
# Returns the batch's owner after the call: the client if it was free, "" if the batch
# exists without an owner (made by ``medq enqueue`` or ``from producer import enqueue``).
CLAIM_BATCH_LUA = """
local owner = redis.call('GET', KEYS[1])
if owner then return owner end
if redis.call('EXISTS', KEYS[2]) == 1 then return '' end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""


def claim_batch(r: redis.Redis, batch: str, client: str) -> str:
    """Make ``client`` the owner of ``batch`` unless it has one; returns the owner ("" for a
    batch that exists without one)."""
    return _s(r.eval(CLAIM_BATCH_LUA, 2, owner_key(batch), batch_key(batch), client))


def owner_of(r: redis.Redis, batch: str) -> str | None:
    """The client that owns ``batch``; "" if it exists without one, None if there is no such batch."""
    pipe = r.pipeline(transaction=False)
    pipe.get(owner_key(batch))
    pipe.exists(batch_key(batch))
    pipe.exists(failed_key(batch))
    owner, exists, has_failed = pipe.execute()
    if owner is not None:
        return _s(owner)
    return "" if exists or has_failed else None


def batch_of(r: redis.Redis, job_id: str) -> str | None:
    """The batch a job belongs to; None if there is no such job."""
    batch = r.hget(job_key(job_id), JobField.BATCH)
    return None if batch is None else _s(batch)


def stored_records(r: redis.Redis, job_ids: list[str]) -> list[tuple[bytes | None, bytes | None]]:
    """For each job, in order: its stored record (the payload, sealed when
    MEDQ_ENCRYPTION_KEY is set; None once the job succeeded and it was dropped) and the
    digest of the record it was enqueued with (``medq review`` matches a notes file by it)."""
    pipe = r.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.get(payload_key(job_id))
        pipe.hget(job_key(job_id), JobField.DIGEST)
    replies = pipe.execute()
    return [(replies[2 * i], replies[2 * i + 1]) for i in range(len(job_ids))]


def run_times_s(r: redis.Redis, job_ids: list[str]) -> list[float | None]:
    """For each job, in order: seconds from enqueue to its last update if it succeeded, else None."""
    pipe = r.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hmget(job_key(job_id), JobField.STATUS, JobField.ENQUEUED_AT, JobField.UPDATED_AT)
    out: list[float | None] = []
    for status, enq, upd in pipe.execute():
        if status != JobStatus.SUCCEEDED.value.encode():
            out.append(None)
            continue
        out.append((datetime.fromisoformat(upd.decode()) - datetime.fromisoformat(enq.decode())).total_seconds())
    return out


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _lua(source: str) -> str:
    """``source`` with each ``$field`` replaced by the quoted ``JobField`` name: an unknown
    field fails here, at import, not in Redis at the first job."""
    return Template(source).substitute({name: f"'{name}'" for name in JOB_FIELDS})


# ------------------------------------------------------------ creating jobs (the producer's)

# Create a job only if its record is not in the batch yet, all at once, so a crash cannot
# leave half a job. A record already there is compared by digest with its newest revision:
# the same record is left alone; another text is a conflict, or with ``replace`` a new
# revision that takes the old one's place in the batch (see medq.core.contract.revision_job_id).
# KEYS[1] the record's first job hash, KEYS[2] its payload string, KEYS[3] batch set,
# KEYS[4] failed set, KEYS[5] (optional) a staged upload: a hash of payloads parked there
# while the rest of the upload arrived (medq.state.uploads)
# ARGV[1] batch, ARGV[2] record id, ARGV[3] schema, ARGV[4] schema version,
# ARGV[5] now (iso), ARGV[6] payload JSON (or, with KEYS[5], its field there),
# ARGV[7] payload TTL seconds, ARGV[8] the first job id, ARGV[9] position in the input
# (results are exported in input order), ARGV[10] the record's digest, ARGV[11] "1" to
# replace a conflicting record, ARGV[12] job key prefix, ARGV[13] payload key prefix,
# ARGV[14] TTL seconds of a replaced revision's marker
# A revision's keys are named here from the prefixes: which revision is current is only
# known inside the script.
# Returns {outcome, job id of the record's current job}: a ``CreateOutcome``.
CREATE_JOB_LUA = _lua("""
local function payload()
  if KEYS[5] then return redis.call('HGET', KEYS[5], ARGV[6]) end
  return ARGV[6]
end
local function create(job_id, p)
  redis.call('HSET', ARGV[12] .. job_id, $batch, ARGV[1], $record_id, ARGV[2], $schema, ARGV[3],
             $schema_version, ARGV[4], $status, 'queued', $attempts, 0, $enqueued_at, ARGV[5],
             $updated_at, ARGV[5], $seq, ARGV[9], $digest, ARGV[10])
  redis.call('SET', ARGV[13] .. job_id, p, 'EX', ARGV[7])
  redis.call('SADD', KEYS[3], job_id)
end
local first = ARGV[8]
if redis.call('EXISTS', KEYS[1]) == 0 then
  local p = payload()
  if not p then return {-1, first} end
  create(first, p)
  return {1, first}
end
local cur = redis.call('HGET', KEYS[1], $superseded_by) or first
local cur_key = ARGV[12] .. cur
-- A new revision of the record takes the place of its current job `cur`.
local function revise(outcome)
  local p = payload()
  if not p then return {-1, cur} end
  local new = first .. '-r' .. redis.call('HINCRBY', KEYS[1], $revisions, 1)  -- revision_job_id
  create(new, p)
  -- The old job leaves the batch and its dead letters and its note goes; its hash stays as
  -- a marker, so a delivery of it still in the queue finds it superseded and does nothing.
  redis.call('SREM', KEYS[3], cur)
  redis.call('ZREM', KEYS[4], cur)
  redis.call('DEL', ARGV[13] .. cur)
  if cur ~= first and redis.call('EXISTS', cur_key) == 1 then
    redis.call('HSET', cur_key, $superseded_by, new)
    redis.call('EXPIRE', cur_key, ARGV[14])
  end
  -- The first job's hash points at the newest revision and lives as long as it does
  -- (the worker gives it the same expiry when that revision succeeds).
  redis.call('HSET', KEYS[1], $superseded_by, new)
  redis.call('PERSIST', KEYS[1])
  return {outcome, new}
end
local h = redis.call('HMGET', cur_key, $digest, $sent, $status)
-- the newest revision's state expired or was purged apart from its first job: the record
-- is not in the batch; it comes back as a new revision (never under an id that has a result)
if not h[3] then return revise(1) end
-- no digest: written before digests were kept, so it cannot be told apart; taken as the same
if not h[1] or h[1] == ARGV[10] then
  if h[2] then return {0, cur} end
  return {2, cur}
end
if ARGV[11] ~= '1' then return {3, cur} end
return revise(4)
""")


class CreateOutcome(IntEnum):
    """What CREATE_JOB_LUA did with a record (its first reply)."""

    EXISTS = 0  # the batch holds it with the same text, its message sent: nothing to do
    CREATED = 1  # a new job
    UNSENT = 2  # the batch holds it, but its message may never have been sent: send it
    CONFLICT = 3  # the batch holds it with another text; nothing written
    REPLACED = 4  # a new revision took the place of the one with another text (``replace``)
    STAGED_GONE = -1  # its payload was parked in an upload that expired; nothing written


@dataclass(frozen=True)
class JobDefaults:
    """The arguments of CREATE_JOB_LUA shared by every record of one enqueue run."""

    batch: str
    schema: str
    schema_version: int
    now_iso: str
    payload_ttl_s: int
    replaced_ttl_s: int  # how long a replaced revision's marker stays (the results' TTL)
    replace: bool = False
    staged: str | None = None  # the upload hash holding the payloads (``medq.state.uploads``)


def create_jobs(
    r: redis.Redis, run: JobDefaults, items: list[tuple[str, str, str]], first_seq: int
) -> list[tuple[CreateOutcome, str]]:
    """CREATE_JOB_LUA for each ``(record id, payload, digest)`` of ``items`` (the payload as
    stored, or with ``run.staged`` its field there), positions ``first_seq`` on, in one round
    trip. Returns each record's outcome and the id of its current job. A full Redis raises
    ``redis.exceptions.OutOfMemoryError``: the caller says how far it got."""
    script = r.register_script(CREATE_JOB_LUA)
    extra_keys = [run.staged] if run.staged else []
    prefixes = [job_key(""), payload_key("")]
    pipe = r.pipeline(transaction=False)
    for i, (record_id, payload, digest) in enumerate(items):
        first = make_job_id(run.batch, record_id, run.schema, run.schema_version)
        script(
            keys=[job_key(first), payload_key(first), batch_key(run.batch), failed_key(run.batch), *extra_keys],
            args=[run.batch, record_id, run.schema, run.schema_version, run.now_iso, payload, run.payload_ttl_s,
                  first, first_seq + i, digest, int(run.replace), *prefixes, run.replaced_ttl_s],
            client=pipe,
        )
    return [(CreateOutcome(int(outcome)), _s(job_id)) for outcome, job_id in pipe.execute()]


def mark_sent(r: redis.Redis, job_ids: list[str]) -> None:
    """Mark the jobs' messages as sent, in one round trip: an enqueue run again sends only
    those not marked (CREATE_JOB_LUA's ``UNSENT``)."""
    pipe = r.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hset(job_key(job_id), JobField.SENT, 1)
    pipe.execute()


# ------------------------------------------------------------ a run's steps (the worker's)


# Start a run: one atomic step that decides whether this delivery may run the job.
START_LUA = _lua("""
-- KEYS: job, payload, watch   ARGV: run_id, lease_ms, max_lost_runs, now_iso, job_id,
--   mode: '1' a many-job message; '0' a job alone in its message; then, for a suspect that
--   came back from the gate (worker.isolation), '2' holding the process alone or '3' among suspects only;
--   peek: '1' when suspects are in the process, so healthy jobs may not start now: a healthy
--   job is answered 'healthy' (nothing written; it waits for its turn and asks again), a
--   suspect as in its mode, at once, so that it joins the suspects or is sent on
-- Returns {verdict, batch, record_id, schema, schema_version, ...}: one round trip
-- reads the job, decides, takes the lease and fetches the record.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], $status, $lease_until, $first_run_ms, $batch, $record_id, $schema,
                     $schema_version, $attempts, $superseded_by, $lost, $spared, $run_mode)
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
-- found running with a lapsed lease: its worker died (or was cut off) during the last run.
-- That death is charged as a lost run, unless the run was among suspects only ('c'): then
-- nobody can pin it on the job, which from now on runs alone (worker.isolation).
local died = h[1] == 'running'
local spared_now = died and h[12] == 'c'
local lost = tonumber(h[10]) or 0
local spared = tonumber(h[11]) or 0
local lost_after = lost + ((died and not spared_now) and 1 or 0)
local alone = spared > 0 or spared_now or lost_after >= tonumber(ARGV[3]) - 1
-- a suspect first takes its turn at the process's gate (alone, or among suspects), then
-- comes back in mode '2' or '3'; nothing is written now, so its death is counted once, on
-- that call. In a message of many (the orphan sweep sends lost jobs together) too, unless
-- it must run alone: the message sends that one on (below), so that the others do not
-- wait for its turn alone.
local suspect = died or lost > 0 or spared > 0
if ARGV[7] == '1' and not suspect then return reply('healthy') end
if ARGV[6] == '0' and suspect then return reply('gate', alone and '1' or '0') end
if ARGV[6] == '1' and suspect and not alone then return reply('gate', '0') end
if ARGV[6] == '3' and alone then return reply('gate', '1') end
if died then
  if spared_now then
    spared = redis.call('HINCRBY', KEYS[1], $spared, 1)
  else
    lost = redis.call('HINCRBY', KEYS[1], $lost, 1)
    -- found in a shared message, a death beside healthy jobs may have been a companion's: that
    -- job runs alone once more first. A death alone ('a') was its own, however it comes back
    -- (the orphan sweep sends lost jobs together): poison now, not one more death later
    if lost >= tonumber(ARGV[3]) and (ARGV[6] ~= '1' or h[12] == 'a') then
      return reply('poison', tostring(lost), h[8] or '0')
    end
  end
end
if ARGV[6] == '1' and (lost > 0 or spared > 0) then
  -- a suspect that must run alone (it died among suspects, or is a death from poison):
  -- not held in this message, whose other jobs would wait for its turn alone; the message
  -- sends it on as its own medq.extract, so that another process may take it meanwhile
  redis.call('HSET', KEYS[1], $status, 'retrying', $updated_at, ARGV[4])
  redis.call('HDEL', KEYS[1], $lease_until, $run_id)
  redis.call('ZADD', KEYS[3], now, ARGV[5])
  return reply('alone', tostring(lost))
end
local run_mode = 'n'
if ARGV[6] == '2' then run_mode = 'a' elseif ARGV[6] == '3' then run_mode = 'c' end
local attempts = redis.call('HINCRBY', KEYS[1], $attempts, 1)
if not h[3] then redis.call('HSET', KEYS[1], $first_run_ms, now) end
redis.call('HSET', KEYS[1], $status, 'running', $lease_until, now + tonumber(ARGV[2]),
           $run_id, ARGV[1], $updated_at, ARGV[4], $run_mode, run_mode)
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[5])
local f = redis.call('HMGET', KEYS[1], $failures, $lost, $first_run_ms, $deferrals, $unsent_runs)
return reply('run', tostring(attempts), f[1] or '0', f[2] or '0', f[3], f[4] or '0', tostring(now), f[5] or '0',
             redis.call('GET', KEYS[2]) or false)
""")

# A job succeeded: final state, no dead letter, state expires with results, note gone.
# A revision's first job (the record's pointer to it) expires with it; a replaced job keeps
# the expiry it was given when replaced (a first job's lives as long as its newest revision).
# Returns 0, writing nothing, for a job no longer there: purged while it ran (see RETRY_LUA).
FINISH_LUA = _lua("""
-- KEYS: job, failed, batch, payload, watch, [first job of this revision]   ARGV: now_iso, results_ttl_s, job_id
local live = redis.call('HMGET', KEYS[1], $status, $batch)
if not live[1] or not live[2] then return 0 end
redis.call('HSET', KEYS[1], $status, 'succeeded', $updated_at, ARGV[1])
redis.call('HDEL', KEYS[1], $error_kind, $error_message, $lease_until, $run_id)
redis.call('ZREM', KEYS[2], ARGV[3])
if redis.call('HEXISTS', KEYS[1], $superseded_by) == 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if KEYS[6] and redis.call('HGET', KEYS[6], $superseded_by) == ARGV[3] then redis.call('EXPIRE', KEYS[6], ARGV[2]) end
redis.call('EXPIRE', KEYS[3], ARGV[2])
redis.call('DEL', KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[3])
return 1
""")

# Why every write of a run's end checks that its job is still there: ``medq purge``
# deletes the job hash while runs are in flight, and a hash of an unfinished job never
# expires, so a missing one (no status or no batch, as START_LUA reads it) was purged.
# Writing to it would bring back a job state, a dead letter or a result the user erased.

# FENCE: a run whose worker was cut off (a partition, a stall) past its lease may come back
# after another delivery took the job over (START_LUA gave it a new run id). What it says
# then is stale: it must not charge the job's budgets again nor make it a dead letter. Its
# success is harmless and still recorded: the results store keeps the first success.

# A run will be tried again later: count it, watch for its return, say why.
RETRY_LUA = _lua("""
-- KEYS: job, watch   ARGV: counter ('failures' or 'deferrals'), due_ms, job_id, error_kind, error_message, now_iso,
--                         unsent ('1': the run sent nothing to the model), run_id
--   counter '': neither (a run handed on to a worker that has the job's schema version)
-- Returns 0, writing nothing, for a job no longer there (purged while it ran); 2, writing
-- nothing, for a run that no longer holds the job (stale: see FENCE).
local live = redis.call('HMGET', KEYS[1], $status, $batch, $run_id)
if not live[1] or not live[2] then return 0 end
if live[3] ~= ARGV[8] then return 2 end
if ARGV[1] ~= '' then redis.call('HINCRBY', KEYS[1], ARGV[1], 1) end
if ARGV[7] == '1' then
  -- START_LUA counted the run as an attempt; it was a delivery only (see worker.policy.decide)
  redis.call('HINCRBY', KEYS[1], $attempts, -1)
  redis.call('HINCRBY', KEYS[1], $unsent_runs, 1)
end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[1], $status, 'retrying', $error_kind, ARGV[4], $error_message, ARGV[5], $updated_at, ARGV[6])
return 1
""")

# A dead letter: listed in the batch's failed set, its state and payload kept (no expiry)
# until it succeeds on a requeue or the batch is purged.
FAIL_LUA = _lua("""
-- KEYS: job, failed, watch, payload, batch   ARGV: error_kind, error_message, now_iso, job_id, failed_at_s,
--   run_id ('' for a job failed before it ran: a poison job)
-- Returns 0, writing nothing, for a job no longer there (purged while it ran); 2, writing
-- nothing, for a run that no longer holds the job (stale: see FENCE).
local live = redis.call('HMGET', KEYS[1], $status, $batch, $run_id)
if not live[1] or not live[2] then return 0 end
if ARGV[6] ~= '' and live[3] ~= ARGV[6] then return 2 end
redis.call('HSET', KEYS[1], $status, 'failed', $error_kind, ARGV[1], $error_message, ARGV[2], $updated_at, ARGV[3])
redis.call('HDEL', KEYS[1], $lease_until, $run_id)
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
redis.call('ZREM', KEYS[3], ARGV[4])
redis.call('PERSIST', KEYS[1])
redis.call('PERSIST', KEYS[4])
redis.call('PERSIST', KEYS[5])
return 1
""")

# A job's runs that sent nothing to the model: its deliveries are its attempts and these.
UNSENT_LUA = _lua("""
-- KEYS: job
return redis.call('HGET', KEYS[1], $unsent_runs)
""")

# Renew a lease, only if this run still holds it (so never on a purged job).
RENEW_LUA = _lua("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], $run_id, $status)
if h[1] == ARGV[1] and h[2] == 'running' then
  redis.call('HSET', KEYS[1], $lease_until, now + tonumber(ARGV[2]))
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
  return 1
end
return 0
""")

# Jobs a live worker holds but runs no lease on (a message waiting for a pool thread or its
# countdown, a job waiting for its turn at the process's gate): heard of for a hold from
# now, renewed while the worker holds them, so the orphan sweep leaves them. Only jobs still
# watched (started, unfinished: XX); a hold may be shorter than a countdown: the worker
# holding the message is alive as long as it renews it, and its death shows in a lease.
HEARD_LUA = _lua("""
-- KEYS: watch   ARGV: hold_ms, job ids...
local t = redis.call('TIME')
local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', until_ms, ARGV[i]) end
return #ARGV - 1
""")

# Jobs put back whose retry message is now in the broker: watched until its countdown's end
# plus the wait the message may have in the broker's queue behind busy workers (the broker
# keeps it: it is not lost). Only jobs still waiting to run ('retrying'): one that another
# worker has taken meanwhile is watched by its lease.
QUEUED_LUA = _lua("""
-- KEYS: watch   ARGV: wait_ms, job key prefix, job ids...
local t = redis.call('TIME')
local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local n = 0
for i = 3, #ARGV do
  if redis.call('HGET', ARGV[2] .. ARGV[i], $status) == 'retrying' then
    redis.call('ZADD', KEYS[1], 'XX', until_ms, ARGV[i])
    n = n + 1
  end
end
return n
""")

# Claim the started jobs not heard of for `grace` past their watch time (a lease's end, a
# retry's due time): a worker gone, or its message. A claimed one is watched again a hold
# from now, so one worker sends each; the hold doubles with each sending (`resent`), from
# `hold_min` up to `hold_max`: a copy lost again (taken by a worker that died before it
# started it) is sent again soon, and one stuck behind a long queue is not sent over and over.
CLAIM_LUA = _lua("""
-- KEYS: watch   ARGV: grace_ms, limit, hold_min_ms, hold_max_ms, job key prefix
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]), 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  local key = ARGV[5] .. id
  local hold = tonumber(ARGV[3])
  if redis.call('HEXISTS', key, $status) == 1 then
    local n = redis.call('HINCRBY', key, $resent, 1)
    hold = math.min(hold * 2 ^ (n - 1), tonumber(ARGV[4]))
  end
  redis.call('ZADD', KEYS[1], now + hold, id)
end
return ids
""")


class ScriptCalls(Protocol):
    """Runs a Lua script: the worker's batcher (``worker.pipeline.Batcher``), which sends
    the steps of all running jobs together, one pipeline per turn of the event loop."""

    def script(self, source: str, keys: list[str], args: list[Any]) -> Awaitable[Any]: ...


def now_iso() -> str:
    """``updated_at`` and a result's ``finished_at``: UTC, to the millisecond."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


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


@dataclass(frozen=True)
class Start:
    """START_LUA's verdict on a delivery, and the facts that go with it.

    ``missing`` (no job state) and ``superseded`` (``superseded_by``) carry no job; the
    others do: ``final`` (``status``, ``attempts``), ``busy`` (``lease_left_ms``),
    ``gate`` (a suspect: take its turn at the process's gate, ``alone`` or among suspects,
    then start in mode '2' or '3'; in a message of many only one that may run among suspects),
    ``healthy`` (a peek at a job that is no suspect: it waits for its turn, then starts),
    ``alone`` and ``poison`` (``lost``; poison also ``attempts``), ``run`` (``run``)."""

    verdict: str
    job: Job | None = None
    run: Run | None = None
    superseded_by: str = ""
    status: str = ""
    attempts: int = 0
    lost: int = 0
    lease_left_ms: int = 0
    alone: bool = False


async def start(calls: ScriptCalls, job_id: str, run_id: str, *, lease_ms: int, max_lost_runs: int, mode: str,
                peek: bool = False) -> Start:
    """Decide whether this delivery runs the job and, if so, take its lease (START_LUA).
    ``peek``: start no healthy job (verdict ``healthy``, nothing written)."""
    res = await calls.script(
        START_LUA, [job_key(job_id), payload_key(job_id), WATCH_KEY],
        [run_id, lease_ms, max_lost_runs, now_iso(), job_id, mode, "1" if peek else "0"],
    )
    verdict = res[0]
    if verdict == "missing":
        return Start(verdict)
    if verdict == "superseded":
        return Start(verdict, superseded_by=res[1])
    job = Job(job_id, batch=res[1], record_id=res[2], schema=res[3], schema_version=int(res[4]))
    rest = res[5:]
    if verdict == "final":
        return Start(verdict, job, status=rest[0], attempts=int(rest[1]))
    if verdict == "busy":
        return Start(verdict, job, lease_left_ms=int(rest[0]))
    if verdict == "alone":
        return Start(verdict, job, lost=int(rest[0]))
    if verdict == "poison":
        return Start(verdict, job, lost=int(rest[0]), attempts=int(rest[1]))
    if verdict == "healthy":
        return Start(verdict, job)
    if verdict != "run":
        return Start(verdict, job, alone=rest[0] == "1")  # gate
    # rest: attempts, failures, lost, first_run_ms, deferrals, now_ms, unsent_runs[, payload]
    run = Run(
        run_id=run_id,
        attempts=int(rest[0]),
        failures=int(rest[1]),
        lost=int(rest[2]),
        deferrals=int(rest[4]),
        waited_s=(int(rest[5]) - int(rest[3])) / 1000,
        unsent_runs=int(rest[6]),
        raw_payload=rest[7] if len(rest) > 7 else None,
    )
    return Start(verdict, job, run=run)


class Wrote(IntEnum):
    """What a run's last step wrote (RETRY_LUA, FAIL_LUA)."""

    PURGED = 0  # nothing: the job is gone (purged while it ran)
    WRITTEN = 1
    STALE = 2  # nothing: another delivery took the job over from this run (FENCE)


async def finish(calls: ScriptCalls, job: Job, results_ttl_s: int) -> bool:
    """Mark the job succeeded (FINISH_LUA). False: it was purged while it ran."""
    # The state lives as long as results do, then goes with its batch; the note is not
    # needed once its result is stored: shorter life, smaller exposure.
    keys = [job_key(job.job_id), failed_key(job.batch), batch_key(job.batch), payload_key(job.job_id), WATCH_KEY]
    first, revision = split_revision(job.job_id)
    if revision:
        keys.append(job_key(first))
    return bool(await calls.script(FINISH_LUA, keys, [now_iso(), results_ttl_s, job.job_id]))


async def put_back(
    calls: ScriptCalls, job: Job, run_id: str, *, counter: str, due_ms: float, error_kind: str, error_message: str,
    unsent: bool,
) -> Wrote:
    """Count a run that will be tried again (``counter``: ``JobField.FAILURES`` or
    ``DEFERRALS``, or "" for neither: handed on uncharged), watch for its return by ``due_ms``
    (its countdown's end; :func:`watch_queued` adds the wait in the broker once the message is
    sent) and say why (RETRY_LUA), if run
    ``run_id`` still holds the job. ``unsent``: the run sent nothing to the model, a delivery
    and not an attempt."""
    return Wrote(int(await calls.script(
        RETRY_LUA, [job_key(job.job_id), WATCH_KEY],
        [counter, due_ms, job.job_id, error_kind, error_message, now_iso(), int(unsent), run_id],
    )))


async def fail(
    calls: ScriptCalls, job: Job, run_id: str, *, error_kind: str, error_message: str, failed_at_s: float
) -> Wrote:
    """Make the job a dead letter (FAIL_LUA), if run ``run_id`` still holds it ("": a job
    failed before it ran)."""
    keys = [job_key(job.job_id), failed_key(job.batch), WATCH_KEY, payload_key(job.job_id), batch_key(job.batch)]
    return Wrote(int(await calls.script(
        FAIL_LUA, keys, [error_kind, error_message, now_iso(), job.job_id, failed_at_s, run_id]
    )))


async def unsent_runs(calls: ScriptCalls, job_id: str) -> int:
    """The job's runs put back before any request (UNSENT_LUA)."""
    return int(await calls.script(UNSENT_LUA, [job_key(job_id)], []) or 0)


async def renew(r: redis.asyncio.Redis, held: list[tuple[str, str]], lease_ms: int) -> None:
    """Renew the leases of ``(job id, run id)`` in one round trip, each only if that run
    still holds it (RENEW_LUA)."""
    script = r.register_script(RENEW_LUA)
    pipe = r.pipeline(transaction=False)
    for job_id, run_id in held:
        await script(keys=[job_key(job_id), WATCH_KEY], args=[run_id, lease_ms, job_id], client=pipe)
    await pipe.execute()


async def keep_heard_of(r: redis.asyncio.Redis, job_ids: list[str], hold_ms: int) -> None:
    """Tell the orphan sweep that a live worker holds these jobs for ``hold_ms`` more (HEARD_LUA)."""
    script = r.register_script(HEARD_LUA)
    for i in range(0, len(job_ids), _HEARD_CHUNK):
        await script(keys=[WATCH_KEY], args=[hold_ms, *job_ids[i:i + _HEARD_CHUNK]])


_HEARD_CHUNK = 1000


async def watch_queued(r: redis.asyncio.Redis, job_ids: list[str], wait_ms: int) -> None:
    """The retries of these jobs are in the broker: watch them ``wait_ms`` from now (QUEUED_LUA)."""
    script = r.register_script(QUEUED_LUA)
    for i in range(0, len(job_ids), _HEARD_CHUNK):
        await script(keys=[WATCH_KEY], args=[wait_ms, job_key(""), *job_ids[i:i + _HEARD_CHUNK]])


async def claim_orphans(
    r: redis.asyncio.Redis, grace_ms: int, hold_min_ms: int, hold_max_ms: int, limit: int = 500
) -> list[str]:
    """The started jobs unheard of for ``grace_ms`` past their watch time that are still
    unfinished, claimed for this caller to send again and watched again a hold from now,
    doubling from ``hold_min_ms`` to ``hold_max_ms`` with each sending (CLAIM_LUA); the
    finished ones among them leave the watch."""
    ids: list[str] = await r.register_script(CLAIM_LUA)(
        keys=[WATCH_KEY], args=[grace_ms, limit, hold_min_ms, hold_max_ms, job_key("")]
    )
    if not ids:
        return []
    pipe = r.pipeline(transaction=False)
    for job_id in ids:
        pipe.hget(job_key(job_id), JobField.STATUS)
    statuses = await pipe.execute()
    unfinished = (JobStatus.RUNNING.value, JobStatus.RETRYING.value)
    done = [j for j, s in zip(ids, statuses, strict=True) if s not in unfinished]
    if done:
        await r.zrem(WATCH_KEY, *done)
    return [j for j, s in zip(ids, statuses, strict=True) if s in unfinished]
