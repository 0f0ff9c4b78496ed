"""A result document and a job's summary: built here, whatever store keeps them.

The document is what CONTRACT.md "Results" describes (one per job id, PHI only in
``data``, ``evidence`` and ``metadata``); the summary is what Celery and Flower see of a
run: ids, status and counts, never record data.
"""

from __future__ import annotations

from typing import Any

from medq.core.contract import JobStatus
from medq.state.jobs import Job, JobState, now_iso


def _blank(record_id: str, job_id: str, batch: str, schema: str, schema_version: int, status: str) -> dict[str, Any]:
    """Every key of a result document (CONTRACT.md "Results"), empty: a document has all
    of them, whether a run stored it or it is read off a job that has none yet."""
    return {
        "id": record_id,
        "job_id": job_id,
        "batch": batch,
        "schema": schema,
        "schema_version": schema_version,
        "status": status,
        "data": None,
        "error": None,
        "model": None,
        "endpoint": None,
        "attempts": 0,
        "deliveries": 0,
        "usage": None,
        "latency_ms": None,
        "metadata": {},
        "evidence": None,
        "provenance": None,
        "finished_at": None,
    }


def document(
    job: Job, status: JobStatus, *, attempts: int, deliveries: int, model: str, endpoint: str, **fields: Any,
) -> dict[str, Any]:
    """The job's result document with ``status``; ``fields`` (``data``, ``error``, ``usage``,
    ``provenance``...) replace the empty ones. ``attempts``: runs that reached the model;
    ``deliveries``: those and the runs put back before any request."""
    doc = _blank(job.record_id, job.job_id, job.batch, job.schema, job.schema_version, status.value)
    doc.update(model=model, endpoint=endpoint, attempts=attempts, deliveries=deliveries, finished_at=now_iso())
    doc.update(fields)
    return doc


def from_state(st: JobState, stored: dict[str, Any] | None) -> dict[str, Any]:
    """The document of a job whose state is newer than its stored result (none yet, or a
    failed job requeued since): what the state says, over what the older run said of its
    model, endpoint, usage and provenance. No ``data`` and no ``evidence``: they stand for
    that older run's answer."""
    doc = _blank(st.record_id, st.job_id, st.batch, st.schema, st.schema_version, st.status)
    if stored:
        doc.update(stored)
        doc.update(id=st.record_id, job_id=st.job_id, batch=st.batch, schema=st.schema, schema_version=st.schema_version)
    error = {"kind": st.error_kind, "message": st.error_message} if st.error_kind else None
    doc.update(status=st.status, data=None, error=error, attempts=st.attempts, deliveries=st.deliveries, evidence=None)
    return doc


def summary(job_id: str, status: JobStatus, attempts: int, latency_ms: float | None = None) -> dict[str, Any]:
    """A run's outcome as the task returns it (Celery's result, Flower): PHI-free."""
    out: dict[str, Any] = {"job_id": job_id, "status": status.value, "attempts": attempts}
    if latency_ms is not None:
        out["latency_ms"] = round(latency_ms, 1)
    return out
