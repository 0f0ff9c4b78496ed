"""What a batch is doing: counts per state, dead letters, and running jobs again."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from medq.core.contract import (
    JobStatus, batch_key, failed_key, job_key, owner_key, payload_key, result_key, revision_job_id, split_revision,
)
from medq.core.errors import EndpointMisconfigured, RetryableError

_CHUNK = 1000
_FIELDS = ("record_id", "status", "attempts", "error_kind", "error_message", "schema", "schema_version", "updated_at", "batch", "seq",
           "superseded_by", "unsent_runs")

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
        for job_id, vals in zip(chunk, pipe.execute()):
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


def requeue(producer: Any, batch: str, all_failed: bool = False) -> RequeueReport:
    """Send failed jobs again: by default those whose error was transient or the
    endpoint's set-up (``REQUEUE_KINDS``); with ``all_failed`` every failed job. A job
    whose stored record is gone is reported. A job whose worker died while it ran goes in
    a message of its own: if its record kills workers, it takes no companions down."""
    r = producer.r
    chosen = [st for st in failed(r, batch) if all_failed or st.error_kind in REQUEUE_KINDS]
    pipe = r.pipeline(transaction=False)
    for st in chosen:
        pipe.exists(payload_key(st.job_id))
        pipe.hget(job_key(st.job_id), "lost")
    out = pipe.execute() if chosen else []
    present, lost = out[0::2], out[1::2]
    suspects = {st.job_id for st, n in zip(chosen, lost) if int(n or 0) > 0}
    ready = [st for st, ok in zip(chosen, present) if ok]
    missing = [st.record_id for st, ok in zip(chosen, present) if not ok]
    pipe = r.pipeline(transaction=False)
    for st in ready:
        pipe.hset(job_key(st.job_id), mapping={"status": JobStatus.QUEUED.value})
        # A fresh budget: failures, lost runs and waiting start again from zero.
        pipe.hdel(job_key(st.job_id), "sent", "failures", "lost", "deferrals", "first_run_ms", "lease_until", "run_id")
        pipe.persist(job_key(st.job_id))  # finished jobs' state expires; a queued one's must not
        pipe.zrem(failed_key(batch), st.job_id)
    pipe.execute()
    producer.send([st.job_id for st in ready if st.job_id not in suspects])
    for st in ready:
        if st.job_id in suspects:
            producer.send([st.job_id])  # one job: a medq.extract message of its own
    return RequeueReport([st.job_id for st in ready], missing)


@dataclass
class PurgeReport:
    jobs: int
    payloads: int
    results: int
    job_ids: list[str] = field(default_factory=list)  # every job purged, replaced revisions too


def purge(r: redis.Redis, batch: str, results: bool = False) -> PurgeReport:
    """Delete a batch from Redis: its records (payloads), job states, sets, and with
    ``results`` its results kept in Redis. Running jobs find their state gone and write
    nothing back (worker.jobs FINISH_LUA and its siblings): a purged job stays purged."""
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


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)
