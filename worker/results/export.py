"""A batch's results in the CONTRACT format: stored results, and the state of unfinished jobs."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

import redis

from producer.batches import JobState, iter_states
from worker.results import ResultStore

CSV_COLUMNS = (
    "id", "job_id", "batch", "schema", "schema_version", "status", "data", "error_kind", "error_message",
    "model", "endpoint", "attempts", "latency_ms", "usage", "metadata",
)

_CHUNK = 500


def iter_results(r: redis.Redis, store: ResultStore, batch: str) -> Iterator[dict[str, Any]]:
    """One document per job in the batch, in input order; ``data`` is null until it succeeds."""
    states = list(iter_states(r, batch))
    for i in range(0, len(states), _CHUNK):
        chunk = states[i : i + _CHUNK]
        stored = {doc["job_id"]: doc for doc in store.get_many(st.job_id for st in chunk)}
        for st in chunk:
            doc = stored.get(st.job_id)
            # The job state is newer when a failed job was requeued after its result was stored.
            if doc is None or doc["status"] != st.status:
                doc = _from_state(st, doc)
            yield doc


def job_doc(r: redis.Redis, store: ResultStore, job_id: str) -> dict[str, Any] | None:
    """One job's document in the CONTRACT format; None if no such job (or its state expired)."""
    states = list(iter_states(r, "", [job_id]))
    if not states:
        return None
    stored = store.get(job_id)
    return stored if stored is not None and stored["status"] == states[0].status else _from_state(states[0], stored)


def _from_state(st: JobState, stored: dict[str, Any] | None) -> dict[str, Any]:
    error = {"kind": st.error_kind, "message": st.error_message} if st.error_kind else None
    doc = dict(stored) if stored else {}
    doc.update(
        id=st.record_id, job_id=st.job_id, batch=st.batch, schema=st.schema, schema_version=st.schema_version,
        status=st.status, data=None, error=error, attempts=st.attempts,
    )
    for key in ("model", "endpoint", "usage", "latency_ms"):
        doc.setdefault(key, None)
    doc.setdefault("metadata", {})
    return doc


def to_jsonl(doc: dict[str, Any]) -> str:
    return json.dumps(doc, ensure_ascii=False)


def csv_header() -> str:
    return _csv_line(CSV_COLUMNS)


def to_csv(doc: dict[str, Any]) -> str:
    error = doc.get("error") or {}
    row = {
        **{k: doc.get(k) for k in CSV_COLUMNS},
        "data": json.dumps(doc["data"], ensure_ascii=False) if doc.get("data") is not None else "",
        "error_kind": error.get("kind") or "",
        "error_message": error.get("message") or "",
        "usage": json.dumps(doc["usage"]) if doc.get("usage") else "",
        "metadata": json.dumps(doc.get("metadata") or {}, ensure_ascii=False),
    }
    return _csv_line(["" if row[c] is None else row[c] for c in CSV_COLUMNS])


def _csv_line(values: Any) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(values)
    return buf.getvalue()
