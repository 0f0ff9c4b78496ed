"""What ``medq api`` documents in its OpenAPI: the request and response bodies, the error
answers each route can give, and the patterns of its ids.

The answers are built as plain dicts in the routes (a ``JSONResponse`` or a stream); these
models describe them (``response_model``) and are what schemathesis checks them against.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from medq.core.contract import BATCH_ID_PATTERN, JobStatus

BATCH_ID = BATCH_ID_PATTERN  # the one rule of medq.core.contract; enqueue checks it too
JOB_ID = r"^[0-9a-f]{32}(-r[0-9]+)?$"  # a revision of a record (medq enqueue --replace) ends in -r<n>
MAX_PROBLEMS_SHOWN = 100


class ProblemOut(BaseModel):
    where: str = Field(description="'line N' (JSON lines) or 'item N (line L)' (a JSON array).")
    line: int | None = Field(description="Line of the body the record starts on.")
    field: str | None = Field(description="The record field at fault: id, text or metadata.")
    record_id: str | None
    message: str


class ErrorOut(BaseModel):
    detail: str
    problems: list[ProblemOut] = Field(default_factory=list,
                                       description=f"At most {MAX_PROBLEMS_SHOWN}, in input order.")
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
    deliveries: int | None = Field(default=None, description=(
        "Runs of the job: its attempts and those put back before any request (no capacity)."))
    usage: dict[str, Any] | None = None
    latency_ms: float | None = None
    metadata: dict[str, Any] | None = None
    evidence: dict[str, list[list[int]]] | None = Field(default=None, description=(
        "Each value's path -> the [start, end] character offsets of the note it was read from."))


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


# ---------------------------------------------------------------- error answers, per route

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "No token, or not one of MEDQ_API__TOKENS."},
    422: {"model": ErrorOut, "description": "A parameter or the body is invalid; the message names it."},
    503: {"model": ErrorOut, "description": "Redis cannot be reached (MEDQ_REDIS_URL); try again."},
}
TAKEN: dict[str, Any] = {"model": ErrorOut, "description": "The batch id is another client's: choose another."}
OWNED = {**ERRORS, 404: {"model": ErrorOut,
                         "description": "No such batch or job, or another client's (the same answer)."}}
BATCH_READ = {**OWNED, 410: {"model": ErrorOut, "description": (
    "The batch was made, but its job states are gone from Redis: purged, expired, or lost when Redis "
    "restarted without persistence. It is not finished; enqueue its records again to run them.")}}


# ---------------------------------------------------------------- request bodies read by hand
# POST /v1/jobs and /v1/batches read their bodies themselves (a batch as a stream, and
# neither echoes a record's text in an error), so their bodies are documented here rather
# than declared as parameters. The schema names are the app's own: ``with_schema_names``
# adds them to the document.

JOB_IN_SCHEMA: dict[str, Any] = JobIn.model_json_schema(by_alias=True)
RECORD_ITEM_SCHEMA: dict[str, Any] = {
    **{k: v for k, v in JOB_IN_SCHEMA.items() if k != "example"},
    "properties": {k: v for k, v in JOB_IN_SCHEMA["properties"].items() if k in ("id", "text", "metadata")},
    "required": ["id", "text"],
}


def with_schema_names(doc: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The OpenAPI ``doc`` with the loaded extraction schemas as the ``enum`` of POST
    /v1/jobs's ``schema`` field and POST /v1/batches's ``schema`` parameter. Idempotent:
    FastAPI keeps the document and hands the same one out again."""
    job_body = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    job_body["properties"]["schema"]["enum"] = names
    for param in doc["paths"]["/v1/batches"]["post"]["parameters"]:
        if param["name"] == "schema" and param["in"] == "query":
            param["schema"]["enum"] = names
    return doc
