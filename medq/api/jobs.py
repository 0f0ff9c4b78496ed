"""``/v1/jobs``: enqueue one record, and read one job.

A single record is small (at most MEDQ_MAX_RECORD_BYTES), so it is read whole and
written directly, not parked like a batch's records.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import APIRouter, Depends, Request, Security
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from medq.api.auth import client_of
from medq.api.deps import ApiState, api_state
from medq.api.errors import APIError, opened
from medq.api.models import BATCH_ID, ERRORS, JOB_ID, JOB_IN_SCHEMA, OWNED, TAKEN, ErrorOut, JobAccepted, ResultDoc
from medq.core.errors import UnknownSchema
from medq.core.schemas import ExtractionSchema
from medq.state.jobs import batch_of, claim_batch
from medq.state.results.export import job_doc
from producer.enqueue import BatchHasher, EnqueueResult
from producer.records import Record, RecordChecker, RecordProblem, limits_of
from producer.uploads import problem_json

log = logging.getLogger("medq.api")
router = APIRouter(tags=["jobs"])

_REQUEST_BODY = {"required": True, "content": {"application/json": {"schema": JOB_IN_SCHEMA}}}
_CONFLICT = {"model": ErrorOut, "description": "The batch already holds this record id with different text."}


@router.post("/v1/jobs", status_code=202, response_model=JobAccepted,
             responses={**ERRORS, 403: TAKEN, 413: {"model": ErrorOut}, 409: _CONFLICT},
             openapi_extra={"requestBody": _REQUEST_BODY})
async def post_job(request: Request, client: str = Security(client_of),
                   state: ApiState = Depends(api_state)) -> JSONResponse:
    """Enqueue one record. The same record sent again gets the same job id and runs once."""
    body = await _read_body(request, state.max_item_bytes + 4096)
    sch, batch, checked = _job_of(state, _json_object(body))
    result = await run_in_threadpool(_write, state, client, sch, batch, checked)
    if result.conflicts:
        raise APIError(409, f"record {checked.id!r} is already in batch {result.batch!r} (job {result[0]}) with "
                            "different text or metadata; the new text was NOT enqueued. Send the correction "
                            "under another batch or record id.")
    log.info("job %s in batch %s (%s) from %s", result[0], result.batch, "new" if result.created else "existing",
             client)
    return JSONResponse(
        {"job_id": result[0], "batch": result.batch, "id": checked.id, "created": bool(result.created)},
        status_code=202, headers={"Location": f"/v1/jobs/{result[0]}"},
    )


@router.get("/v1/jobs/{job_id}", response_model=ResultDoc, responses=OWNED)
def get_job(job_id: str, client: str = Security(client_of), state: ApiState = Depends(api_state)) -> JSONResponse:
    """A job's state, and its result once it has one (the CONTRACT result format)."""
    if not re.fullmatch(JOB_ID, job_id):
        raise APIError(404, "no such job (job ids are 32 hex digits, then -r<n> for a revision)")
    batch = batch_of(state.r, job_id)
    if batch is None:
        raise APIError(404, f"no job {job_id}")
    state.own(client, batch, f"no job {job_id}")
    doc = opened(lambda: job_doc(state.r, state.store, job_id))
    if doc is None:
        raise APIError(404, f"no job {job_id}")
    return JSONResponse(doc)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) past ``limit`` bytes, whether declared or not."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the body is {declared} bytes, over the limit of {limit} for one record "
                            "(MEDQ_MAX_RECORD_BYTES; send many records to POST /v1/batches)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the body is over the limit of {limit} bytes for one record (MEDQ_MAX_RECORD_BYTES)")
    return bytes(body)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise APIError(422, "the body is not a JSON object (send {\"schema\", \"id\", \"text\"})") from None
    if not isinstance(doc, dict):
        raise APIError(422, "the body must be a JSON object with schema, id and text")
    return doc


def _job_of(state: ApiState, doc: dict[str, Any]) -> tuple[ExtractionSchema, str | None, Record]:
    """The schema, the batch asked for and the checked record of a body; a 422 that names
    the field otherwise (never its value)."""
    sch_name, batch = doc.get("schema"), doc.get("batch")
    if not isinstance(sch_name, str):
        raise APIError(422, 'field "schema": required, a schema name (GET /v1/schemas)')
    if batch is not None and (not isinstance(batch, str) or not re.fullmatch(BATCH_ID, batch)):
        raise APIError(422, f'field "batch": must match {BATCH_ID}')
    try:
        sch = state.producer.schema_loader.get(sch_name)
    except UnknownSchema as exc:
        raise APIError(422, f'field "schema": {exc.message}') from None
    checked = RecordChecker(**limits_of(state.settings)).check("body", doc)
    if isinstance(checked, RecordProblem):
        raise APIError(422, f"field {checked.field!r}: {checked.message}" if checked.field else checked.message,
                       [problem_json(checked)], 1)
    return sch, batch, checked


def _write(state: ApiState, client: str, sch: ExtractionSchema, batch: str | None, rec: Record) -> EnqueueResult:
    """Claim the batch for ``client`` and write the record's job (in a worker thread: it
    talks to Redis). By default the batch is derived from the record, salted with the
    client, so two clients sending the same record get a job each."""
    hasher = BatchHasher(sch.name, sch.version, salt=client)
    item = state.producer.job_item(rec, hasher)
    bid = batch or hasher.batch_id()
    if state.taken(claim_batch(state.r, bid, client), client):
        raise APIError(403, f"batch {bid!r} belongs to another client")
    return state.producer.write_jobs(bid, sch, [item])
