"""``POST /v1/batches``: a batch of records, read as a stream.

The body is cut into records as it arrives and each good record is parked in Redis
(``producer.uploads.Upload``), so a large upload does not sit in the service's memory.
Only when the whole body is in and checked are the jobs written, all or none; whatever
goes wrong before (a bad body, a client gone, Redis away) leaves nothing parked.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Security
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from medq.api.auth import client_of
from medq.api.deps import ApiState, api_state
from medq.api.errors import APIError
from medq.api.models import BATCH_ID, ERRORS, MAX_PROBLEMS_SHOWN, RECORD_ITEM_SCHEMA, TAKEN, BatchAccepted, ErrorOut
from medq.core.errors import UnknownSchema
from medq.state.jobs import claim_batch, owner_of
from producer.enqueue import EnqueueResult
from producer.uploads import BodyParser, Upload, problem_json

log = logging.getLogger("medq.api")
router = APIRouter(tags=["batches"])

_REQUEST_BODY = {"required": True, "description": (
    "Records as JSON lines (application/x-ndjson) or one JSON array (application/json) of "
    '{"id", "text", "metadata"} objects. Read as a stream.'),
    "content": {
        "application/x-ndjson": {"schema": {"type": "string"}},
        "application/json": {"schema": {"type": "array", "minItems": 1, "items": RECORD_ITEM_SCHEMA}},
    }}
_TOO_LARGE = {"model": ErrorOut, "description": "Over MEDQ_API__MAX_BATCH_BYTES or MEDQ_API__MAX_BATCH_RECORDS."}


@router.post("/v1/batches", status_code=202, response_model=BatchAccepted,
             responses={**ERRORS, 403: TAKEN, 413: _TOO_LARGE}, openapi_extra={"requestBody": _REQUEST_BODY})
async def post_batch(
    request: Request,
    # the loaded schemas are added as this parameter's enum in the app's OpenAPI (models.with_schema_names)
    schema: str = Query(description="An extraction schema (GET /v1/schemas)."),
    batch: str | None = Query(None, pattern=BATCH_ID, description="Batch id; default: derived from the records."),
    skip_invalid: bool = Query(False, description="Enqueue the good records and list the bad ones; default: "
                                                  "nothing is enqueued if any record is bad."),
    client: str = Security(client_of),
    state: ApiState = Depends(api_state),
) -> JSONResponse:
    """Enqueue a batch. All or nothing unless skip_invalid: every bad record is reported with its
    line, field and record id, and nothing is enqueued. Sending the same body again enqueues nothing new."""
    try:
        upload = Upload(state.producer, schema, salt=client)
    except UnknownSchema as exc:
        raise APIError(422, f"query parameter 'schema': {exc.message}") from None
    if batch is not None and state.taken(await run_in_threadpool(owner_of, state.r, batch), client):
        raise APIError(403, f"batch {batch!r} belongs to another client")
    max_body = state.settings.api.max_batch_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body:
        raise APIError(413, f"the body is {declared} bytes, over the limit of {max_body} (MEDQ_API__MAX_BATCH_BYTES)")
    try:
        size = await _park(request, upload, state)
        _answer_problems(upload, skip_invalid)
        bid = upload.batch_id(batch)
        if state.taken(await run_in_threadpool(claim_batch, state.r, bid, client), client):
            raise APIError(403, f"batch {bid!r} belongs to another client")
        result = await run_in_threadpool(upload.commit, bid, True)  # the problems were answered above
    except BaseException:  # a bad body, a client gone mid-upload, Redis away: nothing stays parked
        await run_in_threadpool(upload.discard)
        raise
    log.info("batch %s: %d job(s), %d new, %d skipped, %d bytes, from %s",
             result.batch, len(result), result.created, upload.problem_count, size, client)
    return JSONResponse(_accepted(result, upload), status_code=202, headers={"Location": f"/v1/batches/{result.batch}"})


async def _park(request: Request, upload: Upload, state: ApiState) -> int:
    """Read the body into ``upload``, record by record, within MEDQ_API__MAX_BATCH_BYTES and
    MEDQ_API__MAX_BATCH_RECORDS (413 past either); returns its size in bytes."""
    max_body, max_records = state.settings.api.max_batch_bytes, state.settings.api.max_batch_records
    parser = BodyParser(state.max_item_bytes)
    size = 0

    def too_many() -> None:
        if len(upload.record_ids) + upload.problem_count > max_records:
            raise APIError(413, f"the body holds more than {max_records} records (MEDQ_API__MAX_BATCH_RECORDS); "
                                "send them as several batches")
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise APIError(413, f"the body is over the limit of {max_body} bytes (MEDQ_API__MAX_BATCH_BYTES)")
        items = parser.feed(chunk)
        if items:
            await run_in_threadpool(upload.add, items)
            too_many()
    await run_in_threadpool(upload.add, parser.end())
    too_many()
    if parser.fatal is not None:
        upload.note_problem(parser.fatal)
        raise APIError(422, f"the body cannot be read past {parser.fatal.where}; nothing was enqueued",
                       *_shown(upload))
    return size


def _answer_problems(upload: Upload, skip_invalid: bool) -> None:
    """A 422 when there is nothing to enqueue, or bad records and not ``skip_invalid``."""
    if not upload.record_ids:
        detail = "no valid records in the body" if upload.problem_count else "the body holds no records"
        raise APIError(422, detail + "; nothing was enqueued", *_shown(upload))
    if upload.problem_count and not skip_invalid:
        raise APIError(422, f"{upload.problem_count} invalid record(s); nothing was enqueued "
                            "(fix them, or send skip_invalid=true)", *_shown(upload))


def _shown(upload: Upload) -> tuple[list[dict[str, Any]], int]:
    """The problems an answer lists (the first MAX_PROBLEMS_SHOWN) and how many there are."""
    return [problem_json(p) for p in upload.problems[:MAX_PROBLEMS_SHOWN]], upload.problem_count


def _accepted(result: EnqueueResult, upload: Upload) -> dict[str, Any]:
    return {"batch": result.batch, "jobs": len(result), "created": result.created, "existing": result.existing,
            "skipped": [problem_json(p) for p in upload.problems[:MAX_PROBLEMS_SHOWN]],
            "skipped_count": upload.problem_count,
            "conflicts": result.conflicts[:MAX_PROBLEMS_SHOWN], "conflict_count": len(result.conflicts)}
