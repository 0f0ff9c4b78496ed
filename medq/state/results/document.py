"""A result document and a job's summary: built here, whatever store keeps them.

The document is what CONTRACT.md "Results" describes (one per job id, PHI only in
``data``, ``evidence`` and ``metadata``); the summary is what Celery and Flower see of a
run: ids, status and counts, never record data.
"""

from __future__ import annotations

from typing import Any

from medq.core.contract import JobStatus
from medq.state.jobs import Job, now_iso


def document(
    job: Job, status: JobStatus, *, attempts: int, deliveries: int, model: str, endpoint: str, **fields: Any,
) -> dict[str, Any]:
    """The job's result document with ``status``; ``fields`` (``data``, ``error``, ``usage``,
    ``provenance``...) replace the empty ones. ``attempts``: runs that reached the model;
    ``deliveries``: those and the runs put back before any request."""
    doc: dict[str, Any] = {
        "id": job.record_id,
        "job_id": job.job_id,
        "batch": job.batch,
        "schema": job.schema,
        "schema_version": job.schema_version,
        "status": status.value,
        "data": None,
        "error": None,
        "model": model,
        "endpoint": endpoint,
        "attempts": attempts,
        "deliveries": deliveries,
        "usage": None,
        "latency_ms": None,
        "metadata": {},
        "evidence": None,
        "provenance": None,
        "finished_at": now_iso(),
    }
    doc.update(fields)
    return doc


def summary(job_id: str, status: JobStatus, attempts: int, latency_ms: float | None = None) -> dict[str, Any]:
    """A run's outcome as the task returns it (Celery's result, Flower): PHI-free."""
    out: dict[str, Any] = {"job_id": job_id, "status": status.value, "attempts": attempts}
    if latency_ms is not None:
        out["latency_ms"] = round(latency_ms, 1)
    return out
