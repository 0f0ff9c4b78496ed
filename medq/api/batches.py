"""``/v1/batches/{batch}``: a batch's counts, its results, and running its failed jobs again.

A batch is read only by the client that made it; to another client it does not exist
(``ApiState.own``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends, Query, Security
from fastapi.responses import StreamingResponse

from medq.api.auth import client_of
from medq.api.deps import ApiState, api_state
from medq.api.errors import APIError, opened
from medq.api.models import BATCH_READ, OWNED, BatchStatus, RequeueOut
from medq.core.contract import JobStatus
from medq.core.errors import BATCH_GONE_CAUSES
from medq.state.jobs import counts, requeue
from medq.state.results.export import iter_results, to_jsonl

log = logging.getLogger("medq.api")
router = APIRouter(tags=["batches"])

_RESULTS_200 = {"description": "One JSON document a line, in input order (CONTRACT format).",
                "content": {"application/x-ndjson": {"schema": {"type": "string"}}}}


@router.get("/v1/batches/{batch}", response_model=BatchStatus, responses=BATCH_READ)
def get_batch(batch: str, client: str = Security(client_of), state: ApiState = Depends(api_state)) -> dict[str, Any]:
    """Jobs per state. A batch without job states is a 410, never done: its states are gone."""
    state.own(client, batch)
    c = counts(state.r, batch)
    total = sum(c.values())
    if total == 0:
        raise _gone(batch)
    return {"batch": batch, "total": total, **c, "done": c["succeeded"] + c["failed"] == total}


@router.get("/v1/batches/{batch}/results", responses={**BATCH_READ, 200: _RESULTS_200})
def get_results(
    batch: str,
    status: JobStatus | None = Query(None, description="Only jobs in this state."),
    client: str = Security(client_of),
    state: ApiState = Depends(api_state),
) -> StreamingResponse:
    """The batch's results as JSON lines, one per job in input order; data is null until a job succeeds."""
    state.own(client, batch)
    docs = opened(lambda: _peeked(iter_results(state.r, state.store, batch)))
    if docs is None:
        raise _gone(batch)

    def lines() -> Iterator[str]:
        for doc in docs:
            if status is None or doc["status"] == status.value:
                yield to_jsonl(doc) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.post("/v1/batches/{batch}/requeue", response_model=RequeueOut, responses=OWNED)
def post_requeue(
    batch: str,
    all_failed: bool = Query(False, description="Every failed job; default: those that failed on endpoint errors."),
    client: str = Security(client_of),
    state: ApiState = Depends(api_state),
) -> dict[str, Any]:
    """Run the batch's failed jobs again."""
    state.own(client, batch)
    report = requeue(state.producer, batch, all_failed=all_failed)
    log.info("batch %s: %d job(s) requeued by %s", batch, len(report.requeued), client)
    return {"requeued": len(report.requeued), "payload_missing": report.payload_missing}


def _gone(batch: str) -> APIError:
    """The batch was made (its owner is known) but has no job states left: not finished, gone."""
    return APIError(410, f"batch {batch!r} has no job states in Redis: they were {BATCH_GONE_CAUSES}. "
                         "The batch is not finished; enqueue its records again to run them")


def _peeked(it: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]] | None:
    """Reads the first document now, so an error shows as a status rather than a cut-off
    stream; None for a batch without a single job."""
    first = next(it, None)
    if first is None:
        return None

    def rest() -> Iterator[dict[str, Any]]:
        yield first
        yield from it

    return rest()
