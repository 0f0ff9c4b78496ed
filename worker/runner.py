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
  host gone or cut off). The orphan sweep (``worker.leases``) sends it again once its
  lease has lapsed, in seconds, not after the broker's visibility timeout. After
  ``MEDQ_WORKER__MAX_LOST_RUNS`` lost runs it is a poison job and goes to dead letters
  instead of killing workers forever; after a lost run it runs apart from healthy jobs
  (``worker.isolation``), so another record's deaths are not its.
- A run that lost its lease (its worker cut off, then back) is *stale*: once another
  delivery has taken the job over, its retry or failure writes nothing (``FENCE`` in
  ``medq.state.jobs``), and the result store keeps the first success.

A job of a schema version this worker has not loaded (a fleet in a rolling schema upgrade)
is not run here: it goes back uncharged on that version's queue, which only the workers
that have it take, or, when no live worker has it (``medq.state.fleet``), fails at once as
``schema_unavailable``, saying which worker to start (``worker.policy.place``).

Budgets: charged errors (timeouts, 5xx) count against ``MEDQ_WORKER__MAX_RETRIES``;
back-pressure (busy, down, rate-limited, no capacity) only delays the job, for at most
``MEDQ_WORKER__MAX_WAIT_S``. Dead letters keep their payload until the job succeeds
or the batch is purged, so ``medq requeue`` can run them again.

Only ids and PHI-free summaries leave this module: the note is read from the
payload store, given to the processor, and dropped.

Where the parts live: the job hash's steps in ``medq.state.jobs``, the retry decision in
``worker.policy``, leases and lost messages in ``worker.leases``, the result document in
``medq.state.results.document``, the loop that runs all this in ``worker.engine``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
import redis.asyncio

from medq.core.contract import JobStatus
from medq.core.crypto import Sealer, open_text
from medq.core.errors import (
    MedqError,
    NoCapacity,
    PayloadMissing,
    PermanentError,
    RetryableError,
    SchemaUnavailable,
    ServerError,
    StoreUnavailable,
    TimeLimitExceeded,
    WorkerLost,
)
from medq.core.ids import new_id
from medq.core.settings import Settings
from medq.state import fleet, jobs
from medq.state.connect import connect
from medq.state.endpoints import watch_grants
from medq.state.jobs import Job, Run, Wrote
from medq.state.metrics import flush_forever, metrics
from medq.state.results import ResultStore, open_store_for
from medq.state.results.document import document, summary
from worker.endpoints import EndpointPool
from worker.extract.processor import Extraction, MedicalDataProcessor
from worker.isolation import SuspectGate, Turn
from worker.leases import Leases
from worker.pipeline import Batcher
from worker.policy import GiveUp, Limits, RunFacts, compute_backoff, decide, place

log = logging.getLogger("medq.worker")

# A store that comes back is written to within this long; MEDQ_WORKER__STORE_WAIT_S bounds the whole wait.
_STORE_RETRY_MAX_S = 30.0

T = TypeVar("T")

Outcome = dict[str, Any]  # a run's summary (``medq.state.results.document.summary``)


@dataclass(frozen=True)
class _NeedsGate:
    """_run's answer for a suspect: run it again once its turn at the process's gate comes,
    ``alone`` or among suspects only."""

    alone: bool


@dataclass(frozen=True)
class RetryLater:
    """Send the job again in ``countdown_s``, on ``queue`` when it is not the ``medq`` one
    (a schema version's: ``worker.policy.HandOff``)."""

    countdown_s: float
    error: RetryableError
    queue: str | None = None
    own_message: bool = False  # sent as a message of its own (a suspect that must run alone), never with others


class JobRunner:
    """Runs jobs on one asyncio loop (the process's ``worker.engine.Engine``): every job of
    the process shares one async Redis client, one HTTP connection pool per endpoint and
    one lease heartbeat. Make it, and call it, inside that loop."""

    def __init__(
        self,
        settings: Settings,
        processor: MedicalDataProcessor | None = None,
        store: ResultStore | None = None,
    ) -> None:
        self.settings = settings
        self.r = connect(settings.redis_url, asyncio=True, decode_responses=True)
        self.batch = Batcher(self.r)  # the per-job calls of all running jobs, pipelined
        self.sealer = Sealer.from_settings(settings)  # MEDQ_ENCRYPTION_KEY: payloads and results at rest
        self.store = store or open_store_for(settings)
        self.pool = EndpointPool.from_settings(
            settings, connect(settings.redis_url, decode_responses=True), processor, batcher=self.batch
        )
        self.limits = Limits.from_settings(settings)
        self.leases = Leases(self.r, int(settings.worker.lease_s * 1000))
        # a job whose worker died runs apart from healthy jobs; suspects together, at most as
        # many as may be in flight from this process (more would only wait, exposed to a death)
        in_flight = settings.llm.max_in_flight * len(settings.llm.all_endpoints)
        self.gate = SuspectGate(company_max=in_flight)
        self.stopping = asyncio.Event()  # the worker stops: jobs in line go back (Engine.stop_taking)
        self._flusher: asyncio.Task[None] | None = None
        self._who = f"{socket.gethostname()}:{os.getpid()}"
        # in the fleet (``medq.state.fleet``): one per runner, two in one process included
        self.worker_id = f"{self._who}:{new_id()[:8]}"

    @property
    def processor(self) -> MedicalDataProcessor:
        return self.pool.primary.processor

    async def aclose(self) -> None:
        """Stop the metrics flusher and the lease heartbeat, and close every connection
        (Redis, HTTP, the results store). Jobs still running are not waited for."""
        if self._flusher is not None:
            self._flusher.cancel()
        try:  # what was counted since the last flush is not lost with the engine
            await metrics.flush(self.r, self._who, 0)
        except redis.RedisError as exc:
            log.warning("metrics flush at close: %s", type(exc).__name__)
        await self.leases.aclose()
        await self.pool.aclose()
        await asyncio.to_thread(self.store.close)
        await self.r.aclose()

    def keep_flushing_metrics(self) -> None:
        """Flush this process's metrics every few seconds (again, if the flusher ended)."""
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(
                flush_forever(self.r, self._who, lambda: len(self.leases))
            )

    async def run_many(self, job_ids: list[str]) -> list[Outcome | RetryLater | BaseException]:
        """Run jobs side by side; each one's outcome, or the exception it raised."""
        shared = len(job_ids) > 1
        self.leases.reserve(job_ids)  # heard of while they wait for their turn (worker.leases)
        try:
            return await asyncio.gather(*(self.run(j, shared) for j in job_ids), return_exceptions=True)
        finally:
            self.leases.unreserve(job_ids)

    async def run(self, job_id: str, shared: bool = False) -> Outcome | RetryLater:
        """Run a job once. Returns its summary, or ``RetryLater``; raises ``PermanentError``
        after recording the failure, so Celery and Flower show it as failed. ``shared``: the
        job came in a message of several; one whose worker died before then runs among
        suspects only, or is sent on to run alone (``worker.isolation``); alone in its
        message it runs among suspects if others are here, else with no other job in this process.

        START_LUA tells a suspect apart in the same round trip that starts a job, so only a
        suspect pays a second call (after its turn at the gate)."""
        mode = "1" if shared else "0"
        outcome: Outcome | RetryLater | _NeedsGate | None = None
        if self.gate.suspects():
            # Healthy jobs wait while suspects are here, but a suspect need not wait for the
            # suspects before it to finish: it joins them, or is sent on to run alone, at once.
            # (No turn: a peek starts no healthy job; a healthy job pays one round trip more.)
            outcome = await self._run(job_id, mode, peek=True)
        if outcome is None:
            async with self.gate.turn(Turn.NORMAL):
                outcome = await self._run(job_id, mode)
        assert outcome is not None  # only a peek answers None
        if isinstance(outcome, _NeedsGate) and not outcome.alone and (shared or self.gate.suspects()):
            # among other suspects (a worker died with many jobs; the orphan sweep sends them
            # together): side by side, apart from healthy jobs. A suspect on its own takes the
            # process alone, so that its death is its own
            async with self.gate.turn(Turn.COMPANY):
                outcome = await self._run(job_id, "3")  # asks for the gate again if it must run alone now
        if isinstance(outcome, _NeedsGate):
            async with self.gate.turn(Turn.ALONE):
                outcome = await self._run(job_id, "2")
        assert outcome is not None and not isinstance(outcome, _NeedsGate)  # mode 2 never asks for the gate
        return outcome

    async def _run(self, job_id: str, mode: str, peek: bool = False) -> Outcome | RetryLater | _NeedsGate | None:
        """One START_LUA and what follows; None: a ``peek`` at a healthy job, which did not start it."""
        run_id = new_id()
        st = await jobs.start(self.batch, job_id, run_id, lease_ms=self.leases.lease_ms,
                              max_lost_runs=self.settings.worker.max_lost_runs, mode=mode, peek=peek)
        if st.verdict == "missing":
            # Nothing to record the failure in: the job was purged or never written.
            log.warning("job %s: no job state in Redis (purged, expired or foreign); dropped", job_id)
            return {"job_id": job_id, "status": "unknown"}
        if st.verdict == "superseded":
            log.info("job %s: replaced by job %s (a corrected record); dropped", job_id, st.superseded_by)
            return {"job_id": job_id, "status": "superseded", "superseded_by": st.superseded_by}
        job = st.job
        assert job is not None
        if st.verdict == "final":
            # Redelivered after it finished (worker lost before the ack): one result only.
            return summary(job_id, JobStatus(st.status), st.attempts)
        if st.verdict == "busy":
            # Another delivery runs it now; come back when its lease would have run out.
            wait_s = min(st.lease_left_ms / 1000 + 1, self.settings.max_countdown_s)
            log.info("job %s: already running elsewhere; checking again in %.1fs", job_id, wait_s)
            return RetryLater(wait_s, RetryableError(f"job {job_id} is running in another worker"))
        if st.verdict == "healthy":
            return None
        if st.verdict == "gate":
            return _NeedsGate(st.alone)
        if st.verdict == "alone":
            # A suspect that must run alone (it died among suspects, or is a death from poison)
            # came in a message of many: it goes on as a message of its own (what the message
            # does with RetryLater), so that a poison record takes down only itself and is
            # charged alone, and the message's other jobs do not wait for its turn.
            log.warning("job %s record %s: a worker died during %s run(s) of it; sent on to run alone",
                        job_id, job.record_id, st.lost)
            return RetryLater(0.0, RetryableError(f"job {job_id} lost a worker before; runs in a message of its own"),
                              own_message=True)
        if st.verdict == "poison":
            exc = WorkerLost(
                f"record {job.record_id}: its worker died during {st.lost} runs (MEDQ_WORKER__MAX_LOST_RUNS); "
                "not run again"
            )
            await self._fail(job, "", st.attempts, exc)
            raise exc
        assert st.run is not None
        handed = await self._unless_loaded(job, st.run)
        if handed is not None:
            return handed
        self.leases.hold(job_id, run_id)
        self.keep_flushing_metrics()
        try:
            return await self._execute(job, st.run)
        finally:
            self.leases.release(job_id)

    async def _execute(self, job: Job, run: Run) -> Outcome | RetryLater:
        if run.lost and await self._already_stored(job):
            # The last run stored its result and died before saying so: finish, do not redo.
            await self._mark_succeeded(job)
            return summary(job.job_id, JobStatus.SUCCEEDED, run.attempts)
        limit_s = self.settings.worker.task_time_limit_s
        try:
            text, metadata = self._load_payload(job, run.raw_payload)
            # The engine enforces the time limit itself (Celery's threads pool cannot):
            # the extraction is cancelled, its endpoint slot given back, the job retried.
            extraction = await self._extract_within(job, text, limit_s)
        except asyncio.TimeoutError:
            return await self._retry_later(job, run, TimeLimitExceeded(
                f"record {job.record_id}: extraction ran past MEDQ_WORKER__TASK_TIME_LIMIT_S={limit_s}s"
            ))
        except RetryableError as exc:
            return await self._retry_later(job, run, exc)
        except PermanentError as exc:
            if await self._fail(job, run.run_id, run.attempts, exc) is Wrote.STALE:
                return self._stale(job)
            raise
        except redis.RedisError:
            raise  # the task puts the message back; the lease lapses and the job runs again
        except Exception as exc:  # a bug: charged like a 5xx, never with its message (it may quote data)
            where = traceback.extract_tb(exc.__traceback__)[-1]
            log.error("job %s: internal error %s at %s:%s",
                      job.job_id, type(exc).__name__, where.filename, where.lineno)
            return await self._retry_later(
                job, run, ServerError(f"internal error in medq ({type(exc).__name__}); see the worker log")
            )
        if not await self._succeed(job, run, extraction, metadata):
            return summary(job.job_id, JobStatus.FAILED, run.attempts)  # the store stayed away: a dead letter
        return summary(job.job_id, JobStatus.SUCCEEDED, run.attempts, extraction.provenance.latency_ms)

    async def _extract_within(self, job: Job, text: str, limit_s: float) -> Extraction:
        """The extraction, given ``limit_s`` (MEDQ_WORKER__TASK_TIME_LIMIT_S) from its first
        model call, not from its start: the jobs of a message wait in line for the endpoint's
        slots (a one-slot server takes them one by one), and that wait is not the job's
        doing; sent back to the broker it would only queue again, as another delivery. One
        that runs past the limit from its first call is cut off and retried (``time_limit``).
        The wait in line is bounded too, well within the broker's visibility timeout (which
        would hand the message to another worker): a job still in line then goes back
        uncharged (``no_capacity``)."""
        line_s = max(limit_s, self.settings.visibility_timeout_s - limit_s - 60)
        granted = watch_grants()  # set by the endpoint's gate when a call of this task is let through
        task = asyncio.ensure_future(self._extract(job, text))
        try:
            waiting = asyncio.ensure_future(granted.wait())
            stopping = asyncio.ensure_future(self.stopping.wait())
            try:
                await asyncio.wait({task, waiting, stopping}, timeout=line_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiting.cancel()
                stopping.cancel()
            if not task.done() and not granted.is_set():
                why = "the worker is stopping" if self.stopping.is_set() else f"waited {line_s:.0f}s in line"
                raise NoCapacity(f"record {job.record_id}: {why} before its turn at the model endpoint; put back",
                                 retry_after_s=1.0)
            return await asyncio.wait_for(task, limit_s)
        finally:
            if not task.done():
                task.cancel()

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

    async def _unless_loaded(self, job: Job, run: Run) -> Outcome | RetryLater | None:
        """None if this worker has the job's schema version loaded. Else, as
        ``worker.policy.place`` says: back uncharged on the queue of the workers that have it,
        or, when no live worker has it, a dead letter (``SchemaUnavailable``, raised)."""
        here = self.processor.schema_loader.versions(job.schema)
        if job.schema_version in here:
            return None
        where = place(job.schema, job.schema_version, job.batch, here, await fleet.live_versions(self.r, job.schema))
        exc = where.error if not isinstance(where, SchemaUnavailable) else where
        # Counted first, also when failing: a delivery, not an attempt (START_LUA counted one).
        # Watched again a lease from now, not the broker's visibility timeout as a retry is:
        # the version's queue may lose its last reader, and then the sweep sends it back here.
        wrote = await jobs.put_back(self.batch, job, run.run_id, counter="",
                                    due_ms=time.time() * 1000 + self.leases.lease_ms,
                                    error_kind=exc.kind, error_message=exc.message, unsent=True)
        if wrote is Wrote.STALE:
            return self._stale(job)
        if isinstance(where, SchemaUnavailable):
            if await self._fail(job, run.run_id, run.attempts - 1, where) is Wrote.STALE:
                return self._stale(job)
            raise where
        metrics.incr("medq_retries_total", schema=job.schema, kind=where.error.kind)
        log.info("job %s record %s: schema %s version %s not loaded here; handed on to %s",
                 job.job_id, job.record_id, job.schema, job.schema_version, where.queue)
        return RetryLater(0.0, where.error, queue=where.queue)

    async def _retry_later(self, job: Job, run: Run, exc: RetryableError) -> Outcome | RetryLater:
        """Put the job back as ``worker.policy.decide`` says, or make it a dead letter
        (raising the error, with why) when a budget is spent."""
        decision = decide(exc, RunFacts(run.failures, run.deferrals, run.waited_s), self.limits)
        # Watched for its return by its due time; while this process holds it (its message
        # runs here), its heartbeat keeps it heard of, and once its retry's message is in the
        # broker, for the wait it may have there too (Engine.sent_back).
        due_ms = time.time() * 1000 + decision.countdown_s * 1000
        # Counted first, also when giving up, so the dead letter's attempts are the runs that reached the model.
        wrote = await jobs.put_back(self.batch, job, run.run_id, counter=decision.counter, due_ms=due_ms,
                                    error_kind=exc.kind, error_message=exc.message, unsent=decision.unsent)
        if wrote is Wrote.STALE:
            return self._stale(job)
        live = wrote is Wrote.WRITTEN
        if isinstance(decision, GiveUp):
            attempts = run.attempts - 1 if decision.unsent else run.attempts
            await self._give_up(job, run.run_id, attempts, exc, decision.why)
        metrics.incr("medq_jobs_total", schema=job.schema, outcome="retried")
        metrics.incr("medq_retries_total", schema=job.schema, kind=exc.kind)
        if live:
            log.info("job %s record %s: %s; retry in %.1fs", job.job_id, job.record_id, exc.kind, decision.countdown_s)
        else:  # the message comes back to nothing and is dropped
            log.info("job %s: purged while it ran; its state stays gone", job.job_id)
        return RetryLater(decision.countdown_s, exc)

    async def _give_up(self, job: Job, run_id: str, attempts: int, exc: RetryableError, why: str) -> None:
        gave_up = type(exc)(f"{exc.message} ({why})", exc.retry_after_s)
        await self._fail(job, run_id, attempts, gave_up)
        raise gave_up from None

    def _stale(self, job: Job) -> Outcome:
        """This run lost its lease and another delivery took the job over: it says nothing more."""
        log.warning("job %s: another delivery took it over while this run was cut off; this run's outcome is dropped",
                    job.job_id)
        metrics.incr("medq_stale_runs_total")
        return {"job_id": job.job_id, "status": "stale"}

    async def _already_stored(self, job: Job) -> bool:
        try:
            doc = await self._while_store_away(job.job_id, lambda: asyncio.to_thread(self.store.get, job.job_id))
        except StoreUnavailable:
            return False  # cannot tell: run it; the first success stays the one kept
        return bool(doc and doc.get("status") == JobStatus.SUCCEEDED.value)

    async def _put(self, doc: dict[str, Any]) -> bool:
        """Store a result; True if written (False: a success was already stored, or the job
        was purged). A store away is back-pressure: the answer is held and written again
        (see :meth:`_while_store_away`); raises ``StoreUnavailable`` once
        MEDQ_WORKER__STORE_WAIT_S passes. Every store alike: one beside the job states
        writes through their pipelines (``ResultStore.aput``)."""
        return await self._while_store_away(doc["job_id"], lambda: self.store.aput(doc, self.batch))

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
                    log.warning(
                        "job %s: result store unavailable (%s); holding the answer, writing again for up to %.0fs",
                        job_id, exc.message, wait_s,
                    )
                    metrics.incr("medq_store_waits_total")
                await asyncio.sleep(min(compute_backoff(tries, self.limits.policy), _STORE_RETRY_MAX_S, left_s))
                tries += 1
                continue
            if tries:
                log.info("job %s: result store answered again after %d tries", job_id, tries + 1)
            return out

    def _load_payload(self, job: Job, raw: str | None) -> tuple[str, dict[str, Any]]:
        if raw is None:
            raise PayloadMissing(
                f"record {job.record_id}: stored record is gone (expired after MEDQ_PAYLOAD_TTL_S or purged); "
                "enqueue it again under a new --batch"
            )
        payload = json.loads(open_text(raw, self.sealer, f"the stored record {job.record_id}"))
        return payload["text"], payload.get("metadata") or {}

    async def _succeed(self, job: Job, run: Run, ex: Extraction, metadata: dict[str, Any]) -> bool:
        """Store the result and finish the job. False if the store stayed away past
        MEDQ_WORKER__STORE_WAIT_S: the job is then a dead letter of kind store_unavailable."""
        prov = ex.provenance
        # START_LUA handed out the counts: no round trip for them on the way out
        attempts = run.attempts
        doc = document(
            job, JobStatus.SUCCEEDED, attempts=attempts, deliveries=attempts + run.unsent_runs,
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
            await self._fail(job, run.run_id, attempts, exc, store_result=False)
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
        if not await jobs.finish(self.batch, job, self.settings.results_ttl_s):
            await self._forget_purged(job)

    async def _forget_purged(self, job: Job) -> None:
        """The job's batch was purged while it ran: take back the result this run stored
        before or after the purge. (The Redis store beside the job states refuses a put
        after it, in ``aput``; PostgreSQL or another Redis cannot see the purge when writing.)"""
        log.info("job %s: purged while it ran; no state or result kept", job.job_id)
        await asyncio.to_thread(self.store.delete, [job.job_id])

    async def _fail(self, job: Job, run_id: str, attempts: int, exc: MedqError, store_result: bool = True) -> Wrote:
        """Make the job a dead letter, if run ``run_id`` still holds it ("": a job failed before
        it ran). Its document then goes to the results store too, held while the store is
        away (``_put``); if it stays away, the job state alone says why (``medq failed`` and
        ``medq results`` read it)."""
        # A dead letter, unless the batch was purged while the job ran, or another delivery
        # took the job over from this run (FAIL_LUA).
        wrote = await jobs.fail(self.batch, job, run_id, error_kind=exc.kind, error_message=exc.message,
                                failed_at_s=time.time())
        if wrote is Wrote.PURGED:
            log.info("job %s: purged while it ran; no state or result kept", job.job_id)
            return wrote
        if wrote is Wrote.STALE:
            return wrote
        metrics.incr("medq_jobs_total", schema=job.schema, outcome="failed")
        metrics.incr("medq_dead_letters_total", schema=job.schema, kind=exc.kind)
        if store_result:
            deliveries = attempts + await jobs.unsent_runs(self.batch, job.job_id)
            doc = document(job, JobStatus.FAILED, attempts=attempts, deliveries=deliveries, model=self.processor.model,
                           endpoint=self.processor.base_url, error={"kind": exc.kind, "message": exc.message})
            try:
                await self._put(doc)
            except StoreUnavailable as away:
                log.warning("job %s: its failure was not stored (%s); the job state keeps it", job.job_id, away.kind)
        log.warning("job %s record %s failed: %s", job.job_id, job.record_id, exc.kind)
        return wrote
