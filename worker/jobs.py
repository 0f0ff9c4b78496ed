"""A job's life in a worker: load by id, extract, store one result, record the state.

    queued -> running -> succeeded
                      -> retrying -> running ...   (transient endpoint errors, with backoff)
                      -> failed                    (permanent error, or retry budget spent)

Only ids and PHI-free summaries leave this module: the note is read from the
payload store, given to the processor, and dropped.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import redis

from medq.contract import JobStatus, batch_key, job_key, payload_key
from medq.errors import MedqError, PayloadMissing, PermanentError, RetryableError
from medq.settings import Settings, get_settings
from worker.processor import Extraction, MedicalDataProcessor
from worker.results import ResultStore, open_store
from worker.retry import RetryPolicy, compute_backoff

log = logging.getLogger("medq.worker")


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
    status: JobStatus
    attempts: int

    @classmethod
    def from_hash(cls, job_id: str, h: dict[str, str]) -> Job:
        return cls(
            job_id=job_id,
            batch=h["batch"],
            record_id=h["record_id"],
            schema=h["schema"],
            schema_version=int(h.get("schema_version", 1)),
            status=JobStatus(h.get("status", JobStatus.QUEUED)),
            attempts=int(h.get("attempts", 0)),
        )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        processor: MedicalDataProcessor | None = None,
        store: ResultStore | None = None,
    ) -> None:
        self.settings = settings
        self.r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
        self.store = store or open_store(settings.effective_results_url, ttl_s=settings.results_ttl_s)
        self.processor = processor or MedicalDataProcessor.from_settings(settings)
        w = settings.worker
        self.policy = RetryPolicy(w.max_retries, w.retry_backoff_s, w.retry_backoff_max_s)

    def run(self, job_id: str, retries: int = 0) -> dict[str, Any] | RetryLater:
        """Run a job once. Returns its summary, or ``RetryLater``; raises ``PermanentError``
        after recording the failure, so Celery and Flower show it as failed."""
        h: dict[str, str] = self.r.hgetall(job_key(job_id))  # type: ignore[assignment]  # decode_responses
        if not h:
            # Nothing to record the failure in: the job was purged or never written.
            log.warning("job %s: no job state in Redis (purged, expired or foreign); dropped", job_id)
            return {"job_id": job_id, "status": "unknown"}
        job = Job.from_hash(job_id, h)
        if job.status is JobStatus.SUCCEEDED:
            # Redelivered after it finished (worker lost before the ack): one result only.
            return self._summary(job, job.status)
        # One round trip: count the attempt, mark it running, fetch the record.
        pipe = self.r.pipeline(transaction=False)
        pipe.hincrby(job_key(job_id), "attempts", 1)
        pipe.hset(job_key(job_id), mapping={"status": JobStatus.RUNNING.value, "updated_at": _now()})
        pipe.get(payload_key(job_id))
        attempts, _, raw_payload = pipe.execute()
        try:
            text, metadata = self._load_payload(job, raw_payload)
            extraction = self.processor.process(text, job.schema, record_id=job.record_id)
        except RetryableError as exc:
            if retries >= self.policy.max_retries:
                gave_up = type(exc)(f"{exc.message} (gave up after {attempts} attempts)", exc.retry_after_s)
                self._fail(job, attempts, gave_up)
                raise gave_up from None
            countdown_s = compute_backoff(retries, self.policy, exc.retry_after_s)
            self.r.hset(
                job_key(job_id),
                mapping={
                    "status": JobStatus.RETRYING.value,
                    "error_kind": exc.kind,
                    "error_message": exc.message,
                    "updated_at": _now(),
                },
            )
            log.info("job %s record %s: %s; retry in %.1fs", job_id, job.record_id, exc.kind, countdown_s)
            return RetryLater(countdown_s, exc)
        except PermanentError as exc:
            self._fail(job, attempts, exc)
            raise
        self._succeed(job, attempts, extraction, metadata)
        return self._summary(job, JobStatus.SUCCEEDED, attempts, extraction.provenance.latency_ms)

    @staticmethod
    def _load_payload(job: Job, raw: str | None) -> tuple[str, dict[str, Any]]:
        if raw is None:
            raise PayloadMissing(
                f"record {job.record_id}: stored record is gone (expired after MEDQ_PAYLOAD_TTL_S or purged); enqueue it again under a new --batch"
            )
        payload = json.loads(raw)
        return payload["text"], payload.get("metadata") or {}

    def _doc(self, job: Job, status: JobStatus, attempts: int) -> dict[str, Any]:
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
            "usage": None,
            "latency_ms": None,
            "metadata": {},
            "provenance": None,
            "finished_at": _now(),
        }

    def _succeed(self, job: Job, attempts: int, ex: Extraction, metadata: dict[str, Any]) -> None:
        prov = ex.provenance
        doc = self._doc(job, JobStatus.SUCCEEDED, attempts)
        doc.update(
            data=ex.data_dict(),
            model=prov.model,
            endpoint=prov.endpoint,
            usage=prov.usage,
            latency_ms=round(prov.latency_ms, 1),
            metadata=metadata,
            provenance=prov.as_dict(),
        )
        self.store.put(doc)
        pipe = self.r.pipeline()
        pipe.hset(job_key(job.job_id), mapping={"status": JobStatus.SUCCEEDED.value, "updated_at": _now()})
        pipe.hdel(job_key(job.job_id), "error_kind", "error_message")
        self._expire_state(pipe, job)
        # The note is not needed once its result is stored: shorter life, smaller exposure.
        pipe.delete(payload_key(job.job_id))
        pipe.execute()

    def _fail(self, job: Job, attempts: int, exc: MedqError) -> None:
        doc = self._doc(job, JobStatus.FAILED, attempts)
        doc["error"] = {"kind": exc.kind, "message": exc.message}
        self.store.put(doc)
        # The payload stays, so `medq requeue` can run the job again.
        pipe = self.r.pipeline()
        pipe.hset(
            job_key(job.job_id),
            mapping={
                "status": JobStatus.FAILED.value,
                "error_kind": exc.kind,
                "error_message": exc.message,
                "updated_at": _now(),
            },
        )
        self._expire_state(pipe, job)
        pipe.execute()
        log.warning("job %s record %s failed: %s", job.job_id, job.record_id, exc.kind)

    def _expire_state(self, pipe: Any, job: Job) -> None:
        # A finished job's state lives as long as results do, then goes with its batch.
        pipe.expire(job_key(job.job_id), self.settings.results_ttl_s)
        pipe.expire(batch_key(job.batch), self.settings.results_ttl_s)

    @staticmethod
    def _summary(job: Job, status: JobStatus, attempts: int | None = None, latency_ms: float | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"job_id": job.job_id, "status": status.value, "attempts": attempts or job.attempts}
        if latency_ms is not None:
            out["latency_ms"] = round(latency_ms, 1)
        return out


_runner: JobRunner | None = None
_runner_pid: int | None = None
_lock = threading.Lock()


def get_runner() -> JobRunner:
    """The process's runner: made once per process (a forked child makes its own)."""
    global _runner, _runner_pid
    if _runner is None or _runner_pid != os.getpid():
        with _lock:
            if _runner is None or _runner_pid != os.getpid():
                _runner = JobRunner(get_settings())
                _runner_pid = os.getpid()
    return _runner
