"""``medq api``: the HTTP service for other services, over the same producer code.

Every ``/v1`` route takes a bearer token from ``MEDQ_API__TOKENS`` (``CLIENT:TOKEN``
pairs, or bare tokens, comma-separated). A batch belongs to the client that created
it; to another client's token it does not exist (404, the same answer as for a
batch or job that was never made, so a token cannot tell whether another client's
batch exists); adding to a batch id another client has taken gets 403. ``/healthz`` and ``/metrics`` answer
without a token and say nothing about any record.

Patient text is never logged: the access log names the route template (not the
path), the status, the time and the client; errors name lines, fields and record
ids. Batch bodies are read as a stream and parked in Redis record by record
(``producer/uploads.py``), so a large upload does not sit in the service's memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Iterator
from typing import Any, Literal

import kombu.exceptions
import redis
from fastapi import FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from medq.core.contract import BATCH_ID_PATTERN, JobStatus, job_key
from medq.core.errors import MedqError, RedisFull, UnknownSchema
from medq.core.settings import Settings
from medq.state.jobs import claim_batch, counts, owner_of, requeue
from producer.enqueue import BatchHasher, Producer, record_digest, sealed_payload
from producer.records import RecordChecker, RecordProblem, limits_of
from producer.uploads import BodyParser, Upload, max_item_bytes, problem_json
from medq.state.metrics import RUNNING_KEY, worker_processes
from medq.state.results import open_store_for
from medq.state.results.export import iter_results, job_doc, to_jsonl

log = logging.getLogger("medq.api")

BATCH_ID = BATCH_ID_PATTERN  # the one rule of medq.core.contract; enqueue checks it too
JOB_ID = r"^[0-9a-f]{32}(-r[0-9]+)?$"  # a revision of a record (medq enqueue --replace) ends in -r<n>
MIN_TOKEN_CHARS = 16
MAX_PROBLEMS_SHOWN = 100
NO_TEXT = "the record's text is never echoed"


class APIError(Exception):
    """An answer with a status and a message (and per-record problems)."""

    def __init__(self, status: int, detail: str, problems: list[dict[str, Any]] | None = None,
                 problem_count: int | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.problems, self.problem_count = status, detail, problems, problem_count
        self.headers = headers


# ---------------------------------------------------------------- tokens


def parse_tokens(raw: str) -> list[tuple[str, str]]:
    """``MEDQ_API__TOKENS`` -> [(client, token)]. ``CLIENT:TOKEN`` names the client; a bare
    token's client is ``client-`` and 8 hex digits of its hash. Errors never show a token."""
    out: list[tuple[str, str]] = []
    for n, part in enumerate((p.strip() for p in raw.split(",")), start=1):
        if not part:
            continue
        client, sep, token = part.partition(":")
        if not sep:
            client, token = "client-" + hashlib.sha256(part.encode()).hexdigest()[:8], part
        if not re.fullmatch(r"[A-Za-z0-9._\-]{1,64}", client):
            raise ValueError(f"MEDQ_API__TOKENS entry {n}: the client name must be letters, digits, '.', '_' or '-'")
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"MEDQ_API__TOKENS entry {n} ({client}): the token is shorter than {MIN_TOKEN_CHARS} "
                             "characters; make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
        out.append((client, token))
    if len({t for _, t in out}) != len(out):
        raise ValueError("MEDQ_API__TOKENS: the same token is given twice")
    return out


_bearer = HTTPBearer(auto_error=False, description="A token from MEDQ_API__TOKENS.")


def client_of(request: Request, cred: HTTPAuthorizationCredentials | None = Security(_bearer)) -> str:
    """The client the bearer token belongs to. Every configured token is compared, in
    constant time, whatever matched before."""
    digests: list[tuple[str, bytes]] | None = request.app.state.token_digests
    if digests is None:  # --insecure-no-auth
        client = "anonymous"
    else:
        if cred is None:
            raise APIError(401, "missing bearer token: send 'Authorization: Bearer <token>' (MEDQ_API__TOKENS)",
                           headers={"WWW-Authenticate": "Bearer"})
        given = hashlib.sha256(cred.credentials.encode("utf-8", "surrogateescape")).digest()
        found = ""
        for name, digest in digests:
            if hmac.compare_digest(given, digest):
                found = name
        if not found:
            raise APIError(401, "invalid bearer token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        client = found
    request.state.client = client
    return client


# ---------------------------------------------------------------- models (OpenAPI)


class ProblemOut(BaseModel):
    where: str = Field(description="'line N' (JSON lines) or 'item N (line L)' (a JSON array).")
    line: int | None = Field(description="Line of the body the record starts on.")
    field: str | None = Field(description="The record field at fault: id, text or metadata.")
    record_id: str | None
    message: str


class ErrorOut(BaseModel):
    detail: str
    problems: list[ProblemOut] = Field(default_factory=list, description=f"At most {MAX_PROBLEMS_SHOWN}, in input order.")
    problem_count: int | None = Field(default=None, description="All the problems found, when there are problems.")


class JobIn(BaseModel):
    """One record and the schema to extract it to."""

    model_config = ConfigDict(populate_by_name=True, json_schema_extra={
        "example": {"schema": "clinical_note", "id": "note-1", "text": "72-year-old man with COPD ...",
                    "metadata": {"ward": "4B"}},
    })
    schema_name: str = Field(alias="schema", description="An extraction schema (GET /v1/schemas).")
    id: str | int = Field(description="The record id (unique in its batch).",
                          json_schema_extra={"anyOf": [{"type": "string", "pattern": r"\S"}, {"type": "integer"}]})
    text: str = Field(description="The note (at most MEDQ_MAX_RECORD_BYTES bytes of UTF-8).", pattern=r"\S")
    metadata: dict[str, Any] | None = Field(default=None, description="Kept with the result; never sent to the model.")
    batch: str | None = Field(default=None, pattern=BATCH_ID,
                              description="Add the job to this batch; default: one derived from the record.")


class JobAccepted(BaseModel):
    job_id: str
    batch: str
    id: str = Field(description="The record id.")
    created: bool = Field(description="False when the same record was already enqueued (nothing runs twice); "
                                      "the same id with different text is a 409.")


class BatchAccepted(BaseModel):
    batch: str
    jobs: int = Field(description="Records accepted.")
    created: int = Field(description="New jobs (the rest were enqueued before).")
    existing: int
    skipped: list[ProblemOut] = Field(default_factory=list, description="With skip_invalid: the records left out.")
    skipped_count: int = 0
    conflicts: list[str] = Field(default_factory=list, description=(
        "Ids of records the batch already held with different text or metadata: their new text was NOT enqueued "
        "(the first 100)."))
    conflict_count: int = 0


class BatchStatus(BaseModel):
    batch: str
    total: int
    queued: int
    running: int
    retrying: int
    succeeded: int
    failed: int
    done: bool = Field(description="Every job succeeded or failed.")


class ErrorDoc(BaseModel):
    kind: str | None
    message: str | None


class ResultDoc(BaseModel):
    """A job and its result, in the CONTRACT format (one line of GET /v1/batches/{batch}/results)."""

    model_config = ConfigDict(extra="allow")
    id: str
    job_id: str
    batch: str
    schema_name: str = Field(alias="schema")
    schema_version: int
    status: JobStatus
    data: dict[str, Any] | None
    error: ErrorDoc | None
    model: str | None = None
    endpoint: str | None = None
    attempts: int
    deliveries: int | None = Field(default=None, description="Runs of the job: its attempts and those put back before any request (no capacity).")
    usage: dict[str, Any] | None = None
    latency_ms: float | None = None
    metadata: dict[str, Any] | None = None
    evidence: dict[str, list[list[int]]] | None = Field(default=None, description="Each value's path -> the [start, end] character offsets of the note it was read from.")


class RequeueOut(BaseModel):
    requeued: int
    payload_missing: list[str] = Field(description="Record ids that cannot run again: their stored record expired.")


class SchemaSummary(BaseModel):
    name: str
    version: int
    description: str
    fields: list[str]


class SchemaDetail(BaseModel):
    name: str
    version: int
    description: str
    instructions: str
    json_schema: dict[str, Any]


class Health(BaseModel):
    status: Literal["ok", "no_workers", "redis_unreachable"]
    redis: bool
    workers: int = Field(description="Worker processes seen in the last few seconds.")


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "No token, or not one of MEDQ_API__TOKENS."},
    422: {"model": ErrorOut, "description": "A parameter or the body is invalid; the message names it."},
    503: {"model": ErrorOut, "description": "Redis cannot be reached (MEDQ_REDIS_URL); try again."},
}
_TAKEN: dict[str, Any] = {"model": ErrorOut, "description": "The batch id is another client's: choose another."}
_OWNED = {**_ERRORS, 404: {"model": ErrorOut, "description": "No such batch or job, or another client's (the same answer)."}}


# ---------------------------------------------------------------- the app


def create_app(settings: Settings, *, insecure_no_auth: bool = False) -> FastAPI:
    """The service. Raises ``ValueError`` when ``MEDQ_API__TOKENS`` is missing or malformed
    (unless ``insecure_no_auth``)."""
    raw = settings.api.tokens.get_secret_value() if settings.api.tokens else ""
    pairs = parse_tokens(raw)
    if not pairs and not insecure_no_auth:
        raise ValueError("set MEDQ_API__TOKENS (CLIENT:TOKEN, comma-separated), or pass --insecure-no-auth")

    app = FastAPI(
        title="medq",
        version="1",
        summary="Enqueue clinical notes for structured extraction by a local LLM, and read the results.",
        description=(
            "Every /v1 route needs `Authorization: Bearer <token>` (MEDQ_API__TOKENS). A batch belongs to the "
            "client that created it. Record text is stored encrypted when MEDQ_ENCRYPTION_KEY is set, travels "
            "to workers only by job id, and is never logged or echoed in errors."
        ),
    )
    app.state.token_digests = None if insecure_no_auth and not pairs else [
        (client, hashlib.sha256(token.encode()).digest()) for client, token in pairs
    ]
    producer = Producer(settings)
    names = producer.schema_loader.names()
    job_in = JobIn.model_json_schema(by_alias=True)
    job_in["properties"]["schema"]["enum"] = names
    record_item = {k: v for k, v in job_in.items() if k != "example"}
    record_item["properties"] = {k: v for k, v in job_in["properties"].items() if k in ("id", "text", "metadata")}
    record_item["required"] = ["id", "text"]
    store = open_store_for(settings)
    r: redis.Redis = producer.r
    max_item = max_item_bytes(settings.max_record_bytes)
    max_body = settings.api.max_batch_bytes
    max_records = settings.api.max_batch_records
    stats = _Stats(settings, r)
    app.add_middleware(_BodyDeadline, timeout_s=settings.api.body_timeout_s)  # inside _Guard: its 408 is logged
    app.add_middleware(_Guard, stats=stats)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        body: dict[str, Any] = {"detail": exc.detail, "problems": exc.problems or []}
        if exc.problem_count is not None:
            body["problem_count"] = exc.problem_count
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # pydantic's errors carry the input; only the place and the reason go back.
        msgs = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(msgs) or "invalid request", "problems": []}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail), "problems": []}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    def own(client: str, batch: str, missing: str | None = None) -> None:
        """Another client's batch (or one from ``medq enqueue``) answers exactly as one that
        does not exist: ``missing``, the caller's 404 for an unknown batch or job. A 403
        would confirm to one client that another's batch or job exists."""
        owner = owner_of(r, batch)
        if owner is None or (owner != client and app.state.token_digests is not None):
            raise APIError(404, missing or f"no batch {batch!r}")

    # ------------------------------------------------------------ jobs

    @app.post("/v1/jobs", status_code=202, response_model=JobAccepted, tags=["jobs"],
              responses={**_ERRORS, 403: _TAKEN, 413: {"model": ErrorOut}, 409: {
                  "model": ErrorOut, "description": "The batch already holds this record id with different text."}},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": job_in}}}})
    async def post_job(request: Request, client: str = Security(client_of)) -> JSONResponse:
        """Enqueue one record. The same record sent again gets the same job id and runs once."""
        limit = max_item + 4096
        body = await _read_body(request, limit)
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            raise APIError(422, "the body is not a JSON object (send {\"schema\", \"id\", \"text\"})") from None
        if not isinstance(doc, dict):
            raise APIError(422, "the body must be a JSON object with schema, id and text")
        sch_name, batch = doc.get("schema"), doc.get("batch")
        if not isinstance(sch_name, str):
            raise APIError(422, 'field "schema": required, a schema name (GET /v1/schemas)')
        if batch is not None and (not isinstance(batch, str) or not re.fullmatch(BATCH_ID, batch)):
            raise APIError(422, f'field "batch": must match {BATCH_ID}')
        try:
            sch = producer.schema_loader.get(sch_name)
        except UnknownSchema as exc:
            raise APIError(422, f'field "schema": {exc.message}') from None
        checked = RecordChecker(**limits_of(settings)).check("body", doc)
        if isinstance(checked, RecordProblem):
            raise APIError(422, f"field {checked.field!r}: {checked.message}" if checked.field else checked.message,
                           [problem_json(checked)], 1)
        hasher = BatchHasher(sch.name, sch.version, salt=client)
        hasher.add(checked)
        bid = batch or hasher.batch_id()

        def write() -> Any:  # one record: written directly, not parked like a batch's
            if claim_batch(r, bid, client) != client and app.state.token_digests is not None:
                raise APIError(403, f"batch {bid!r} belongs to another client")
            return producer.write_jobs(
                bid, sch, [(checked.id, sealed_payload(checked, producer.sealer), record_digest(checked))]
            )

        result = await run_in_threadpool(write)
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

    @app.get("/v1/jobs/{job_id}", response_model=ResultDoc, tags=["jobs"], responses=_OWNED)
    def get_job(job_id: str, client: str = Security(client_of)) -> JSONResponse:
        """A job's state, and its result once it has one (the CONTRACT result format)."""
        if not re.fullmatch(JOB_ID, job_id):
            raise APIError(404, "no such job (job ids are 32 hex digits, then -r<n> for a revision)")
        batch = r.hget(job_key(job_id), "batch")
        if batch is None:
            raise APIError(404, f"no job {job_id}")
        own(client, batch.decode() if isinstance(batch, bytes) else batch, f"no job {job_id}")
        doc = _opened(lambda: job_doc(r, store, job_id))
        if doc is None:
            raise APIError(404, f"no job {job_id}")
        return JSONResponse(doc)

    # ------------------------------------------------------------ batches

    @app.post("/v1/batches", status_code=202, response_model=BatchAccepted, tags=["batches"],
              responses={**_ERRORS, 403: _TAKEN, 413: {"model": ErrorOut, "description": "Over MEDQ_API__MAX_BATCH_BYTES or MEDQ_API__MAX_BATCH_RECORDS."}},
              openapi_extra={"requestBody": {"required": True, "description": (
                  "Records as JSON lines (application/x-ndjson) or one JSON array (application/json) of "
                  '{"id", "text", "metadata"} objects. Read as a stream.'),
                  "content": {
                      "application/x-ndjson": {"schema": {"type": "string"}},
                      "application/json": {"schema": {"type": "array", "minItems": 1, "items": record_item}},
                  }}})
    async def post_batch(
        request: Request,
        schema: str = Query(description="An extraction schema (GET /v1/schemas).", json_schema_extra={"enum": names}),
        batch: str | None = Query(None, pattern=BATCH_ID, description="Batch id; default: derived from the records."),
        skip_invalid: bool = Query(False, description="Enqueue the good records and list the bad ones; default: "
                                                      "nothing is enqueued if any record is bad."),
        client: str = Security(client_of),
    ) -> JSONResponse:
        """Enqueue a batch. All or nothing unless skip_invalid: every bad record is reported with its
        line, field and record id, and nothing is enqueued. Sending the same body again enqueues nothing new."""
        try:
            upload = Upload(producer, schema, salt=client)
        except UnknownSchema as exc:
            raise APIError(422, f"query parameter 'schema': {exc.message}") from None
        if batch is not None:
            owner = await run_in_threadpool(owner_of, r, batch)
            if owner is not None and owner != client and app.state.token_digests is not None:
                raise APIError(403, f"batch {batch!r} belongs to another client")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body:
            raise APIError(413, f"the body is {declared} bytes, over the limit of {max_body} (MEDQ_API__MAX_BATCH_BYTES)")
        parser = BodyParser(max_item)
        size = 0

        def too_many() -> None:
            if len(upload.record_ids) + upload.problem_count > max_records:
                raise APIError(413, f"the body holds more than {max_records} records (MEDQ_API__MAX_BATCH_RECORDS); "
                                    "send them as several batches")
        try:
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
                               [problem_json(p) for p in upload.problems[:MAX_PROBLEMS_SHOWN]], upload.problem_count)
            if not upload.record_ids:
                detail = "no valid records in the body" if upload.problem_count else "the body holds no records"
                raise APIError(422, detail + "; nothing was enqueued",
                               [problem_json(p) for p in upload.problems[:MAX_PROBLEMS_SHOWN]], upload.problem_count)
            if upload.problem_count and not skip_invalid:
                raise APIError(422, f"{upload.problem_count} invalid record(s); nothing was enqueued "
                                    "(fix them, or send skip_invalid=true)",
                               [problem_json(p) for p in upload.problems[:MAX_PROBLEMS_SHOWN]], upload.problem_count)
            bid = upload.batch_id(batch)
            if await run_in_threadpool(claim_batch, r, bid, client) != client and app.state.token_digests is not None:
                raise APIError(403, f"batch {bid!r} belongs to another client")
            result = await run_in_threadpool(upload.commit, bid, True)  # the problems were answered above
        except BaseException:  # a bad body, a client gone mid-upload, Redis away: nothing stays parked
            await run_in_threadpool(upload.discard)
            raise
        log.info("batch %s: %d job(s), %d new, %d skipped, %d bytes, from %s",
                 result.batch, len(result), result.created, upload.problem_count, size, client)
        return JSONResponse(
            {"batch": result.batch, "jobs": len(result), "created": result.created, "existing": result.existing,
             "skipped": [problem_json(p) for p in upload.problems[:MAX_PROBLEMS_SHOWN]],
             "skipped_count": upload.problem_count,
             "conflicts": result.conflicts[:MAX_PROBLEMS_SHOWN], "conflict_count": len(result.conflicts)},
            status_code=202, headers={"Location": f"/v1/batches/{result.batch}"},
        )

    @app.get("/v1/batches/{batch}", response_model=BatchStatus, tags=["batches"], responses=_OWNED)
    def get_batch(batch: str, client: str = Security(client_of)) -> dict[str, Any]:
        """Jobs per state."""
        own(client, batch)
        c = counts(r, batch)
        total = sum(c.values())
        return {"batch": batch, "total": total, **c, "done": c["succeeded"] + c["failed"] == total}

    @app.get("/v1/batches/{batch}/results", tags=["batches"],
             responses={**_OWNED, 200: {"description": "One JSON document a line, in input order (CONTRACT format).",
                                        "content": {"application/x-ndjson": {"schema": {"type": "string"}}}}})
    def get_results(
        batch: str,
        status: JobStatus | None = Query(None, description="Only jobs in this state."),
        client: str = Security(client_of),
    ) -> StreamingResponse:
        """The batch's results as JSON lines, one per job in input order; data is null until a job succeeds."""
        own(client, batch)
        docs = _opened(lambda: _peeked(iter_results(r, store, batch)))

        def lines() -> Iterator[str]:
            for doc in docs:
                if status is None or doc["status"] == status.value:
                    yield to_jsonl(doc) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.post("/v1/batches/{batch}/requeue", response_model=RequeueOut, tags=["batches"], responses=_OWNED)
    def post_requeue(
        batch: str,
        all_failed: bool = Query(False, description="Every failed job; default: those that failed on endpoint errors."),
        client: str = Security(client_of),
    ) -> dict[str, Any]:
        """Run the batch's failed jobs again."""
        own(client, batch)
        report = requeue(producer, batch, all_failed=all_failed)
        log.info("batch %s: %d job(s) requeued by %s", batch, len(report.requeued), client)
        return {"requeued": len(report.requeued), "payload_missing": report.payload_missing}

    # ------------------------------------------------------------ schemas

    @app.get("/v1/schemas", response_model=list[SchemaSummary], tags=["schemas"], responses={401: _ERRORS[401]})
    def list_schemas(client: str = Security(client_of)) -> list[dict[str, Any]]:
        """The extraction schemas loaded from configs/schemas and MEDQ_SCHEMAS_DIRS."""
        return [{"name": s.name, "version": s.version, "description": s.description, "fields": list(s.field_names)}
                for s in producer.schema_loader.all()]

    @app.get("/v1/schemas/{name}", response_model=SchemaDetail, tags=["schemas"],
             responses={401: _ERRORS[401], 404: _OWNED[404]})
    def get_schema(name: str, client: str = Security(client_of)) -> dict[str, Any]:
        """A schema as the JSON Schema the model is asked to follow."""
        try:
            s = producer.schema_loader.get(name)
        except UnknownSchema as exc:
            raise APIError(404, exc.message) from None
        return {"name": s.name, "version": s.version, "description": s.description,
                "instructions": s.instructions, "json_schema": s.json_schema}

    # ------------------------------------------------------------ operations

    @app.get("/healthz", response_model=Health, tags=["operations"],
             responses={503: {"model": Health, "description": "Redis cannot be reached."}})
    def healthz() -> JSONResponse:
        """Redis reachable, and how many worker processes were seen lately. No token needed."""
        try:
            workers = stats.live_workers()
        except redis.RedisError:
            return JSONResponse({"status": "redis_unreachable", "redis": False, "workers": 0}, status_code=503)
        return JSONResponse({"status": "ok" if workers else "no_workers", "redis": True, "workers": workers})

    @app.get("/metrics", tags=["operations"], response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format: medq's metrics and this service's requests."}})
    def metrics() -> Response:
        """Prometheus metrics (no token needed): medq's own series, as `medq metrics` serves them, and
        medq_api_requests_total / medq_api_request_seconds by route template and status."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(stats.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _read_body(request: Request, limit: int) -> bytes:
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


def _opened(fetch: Any) -> Any:
    """Results that cannot be opened (MEDQ_ENCRYPTION_KEY missing or wrong here) are a 500 that says why."""
    try:
        return fetch()
    except MedqError as exc:
        raise APIError(500, exc.message) from None


def _peeked(it: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Reads the first document now, so an error shows as a status rather than a cut-off stream."""
    first = next(it, None)

    def rest() -> Iterator[dict[str, Any]]:
        if first is not None:
            yield first
            yield from it

    return rest()


class _Stats:
    """The service's Prometheus registry (medq's series plus its own) and the worker count."""

    def __init__(self, settings: Settings, r: redis.Redis) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        from medq.tools.metrics_server import MedqCollector

        self.r = r
        self.registry = CollectorRegistry()
        self.registry.register(MedqCollector(r, [ep.url for ep in settings.llm.all_endpoints], settings.llm.max_in_flight))
        self.requests = Counter("medq_api_requests", "HTTP requests by route template, method and status.",
                                ["route", "method", "status"], registry=self.registry)
        self.seconds = Histogram("medq_api_request_seconds", "HTTP request time by route template.", ["route"],
                                 registry=self.registry)

    def live_workers(self) -> int:
        held: dict[bytes, bytes] = self.r.hgetall(RUNNING_KEY)  # type: ignore[assignment]
        return len(worker_processes(held, time.time())[0])


class _Guard:
    """Outermost of the app's own layers: the access log (route template, status, time,
    client; never a path, query or body), request metrics, and errors that escaped a route
    answered without their message (logged by type only)."""

    def __init__(self, app: Any, stats: _Stats) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_logged(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        except Exception as exc:  # noqa: BLE001 - answered here, so uvicorn prints no traceback with a message
            if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, kombu.exceptions.OperationalError)):
                code, detail = 503, "cannot reach Redis (MEDQ_REDIS_URL); try again"
            elif isinstance(exc, RedisFull):  # the jobs not sent are sent by the same request again
                code, detail = 503, exc.message.replace("run the same command again", "send the same request again")
            else:
                code, detail = 500, f"internal error ({type(exc).__name__}); the service log has the request"
            log.error("%s %s failed: %s", scope["method"], _route(scope), type(exc).__name__)
            if status == 0:
                status = code
                body = json.dumps({"detail": detail, "problems": []}).encode()
                await send({"type": "http.response.start", "status": code,
                            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
        finally:
            route = _route(scope)
            elapsed = time.perf_counter() - started
            client = scope.get("state", {}).get("client", "-")
            log.info("%s %s %d %.0fms client=%s", scope["method"], route, status, elapsed * 1000, client)
            self.stats.requests.labels(route, scope["method"], str(status)).inc()
            self.stats.seconds.labels(route).observe(elapsed)


class _BodyDeadline:
    """A request's body must arrive whole within ``MEDQ_API__BODY_TIMEOUT_S`` of its headers,
    or the client gets 408 and the connection is closed. uvicorn has no such bound (its
    ``timeout_keep_alive`` only runs between requests), so a client sending a byte a
    second would hold its connection, and an upload's parked records, for ever. Only the
    body is bounded: once it is in, ``receive`` is passed through as it is (Starlette
    waits on it for a disconnect while a response streams)."""

    def __init__(self, app: Any, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        body_done = False

        async def bounded_receive() -> dict[str, Any]:
            nonlocal body_done
            if body_done:
                return await receive()  # type: ignore[no-any-return]
            try:
                message: dict[str, Any] = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                raise APIError(408, f"the request body did not arrive within {self.timeout_s:g}s "
                                    "(MEDQ_API__BODY_TIMEOUT_S)", headers={"Connection": "close"}) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, bounded_receive, send)


def _route(scope: dict[str, Any]) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "(no route)"
