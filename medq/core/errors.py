"""Every error medq raises on purpose, as one tree with one root.

    MedqError
    ├── RetryableError            the same call may succeed later; retried with backoff
    │   ├── EndpointUnavailable   connection refused / reset, DNS            (back-pressure)
    │   ├── EndpointTimeout       no answer within the timeout               (charged)
    │   ├── RateLimited           HTTP 429; carries the server's Retry-After (back-pressure)
    │   ├── Overloaded            HTTP 503, Ollama's "server busy", "loading model" (back-pressure)
    │   ├── ServerError           other HTTP 5xx                             (charged)
    │   ├── TimeLimitExceeded     the extraction ran past MEDQ_WORKER__TASK_TIME_LIMIT_S (charged)
    │   ├── NoCapacity            medq's own limits (requests/tokens per minute, in-flight cap,
    │   │                         an endpoint cooling down) had no room in time (back-pressure)
    │   ├── SchemaVersionUnavailable  the job's schema version is not loaded in this worker; one
    │   │                         that has it takes the job (back-pressure: a rolling upgrade)
    │   └── StoreUnavailable      the results store (PostgreSQL, Redis) cannot be reached; the
    │                             worker holds the answer and writes again (back-pressure); a job
    │                             fails with it only after MEDQ_WORKER__STORE_WAIT_S
    ├── PermanentError            retrying cannot help; the job goes to dead letters at once
    │   ├── WorkerLost            the job's worker died during MEDQ_WORKER__MAX_LOST_RUNS runs (poison)
    │   ├── InvalidRecord         the record itself is unusable (empty, too large, bad UTF-8)
    │   ├── PayloadMissing        the stored record expired (MEDQ_PAYLOAD_TTL_S) or was purged
    │   ├── UnknownSchema         no schema by that name
    │   ├── SchemaUnavailable     no live worker has the job's schema version loaded: start one
    │   │                         that has it, then plain `medq requeue` runs the job again
    │   ├── SchemaError           a schema file is malformed
    │   ├── RequestRejected       HTTP 4xx other than 429: the request is wrong for the endpoint
    │   ├── EndpointMisconfigured the endpoint is set up wrong for medq, not the record: fix the
    │   │   │                     server or the settings, then plain `medq requeue` runs them again
    │   │   │                     (raised itself for an HTTP 3xx: redirects are not followed)
    │   │   ├── ModelNotFound     HTTP 404: the server does not serve MEDQ_LLM__MODEL
    │   │   ├── PromptTruncated   the server read fewer prompt tokens than the prompt has: its
    │   │   │                     context is too small and it cut the note without saying so
    │   │   └── ContextExceeded   the server refused the prompt as longer than its context (HTTP
    │   │                         400); carries the context size when the server said it
    │   ├── OutputInvalid         still not valid JSON for the schema after the re-asks
    │   └── OutputTruncated       still cut off at max_tokens_cap
    ├── InvalidBatchId (also a ValueError)  a batch id that does not match
    │                         medq.core.contract.BATCH_ID_PATTERN: refused at enqueue, never a job's error
    ├── InputError (also a ValueError)  records refused at enqueue (``problems``: which, with
    │                         line numbers); nothing was enqueued
    ├── UploadExpired (also a RuntimeError)  an upload's staged records expired before its jobs
    │                         were written (it outlived its TTL, medq.state.uploads.STAGE_TTL_S)
    ├── RedisFull             Redis refused a write: used memory is at its maxmemory
    │                         (noeviction). Not a job's fault: workers wait for room;
    │                         `medq enqueue` stops, says how far it got, and a re-run sends the rest.
    └── OperatorError         never a job's error: the person running medq must act (fix a setting,
        │                     install something, wait longer); the command stops with the message
        ├── RemoteEndpointRefused  the privacy guard: an endpoint outside the private network that
        │                     the settings do not allow; the worker does not start (exit 2)
        ├── WaitTimeout       a wait for a batch ran past its timeout (``unfinished`` jobs)
        ├── BatchGone         a batch's job states are gone from Redis (purged, expired, or lost
        │                     with a Redis restarted without persistence): never "finished"
        └── ToolError (also a RuntimeError)  a medq tool cannot go on; the message says what to do
            ├── DemoError     something `medq demo` or `medq bench` needs is missing or died
            ├── LocalModelError  the embedded model cannot be started
            └── PartsError    a split model's parts are missing or do not join into the published file

A retryable error is either *charged* to the job (it may be the record's doing: a
timeout, a 500), counted against ``MEDQ_WORKER__MAX_RETRIES``, or *back-pressure*
(the endpoint is busy, down or rate-limited: not the record's fault), which only
delays the job, for at most ``MEDQ_WORKER__MAX_WAIT_S`` in all. A job whose error
outlives its budget fails with that error's kind.
Messages name a record by its id, never by its text, and never repeat the model's
output, a validation error's input values or a server's error text (which may quote
the request): they end up in logs and in Flower. Endpoint URLs in them have their
userinfo redacted (``medq.core.urls.redact_url``).
"""

from __future__ import annotations

from typing import Any


class MedqError(Exception):
    kind = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:  # picklable/serialisable with its message only
        return (self.__class__, (self.message,))


class RetryableError(MedqError):
    kind = "retryable"
    charged = True  # counts against the job's retry budget; False: back-pressure

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.message, self.retry_after_s))


class EndpointUnavailable(RetryableError):
    kind = "endpoint_unavailable"
    charged = False  # a refused connection is never the record's doing


class EndpointTimeout(RetryableError):
    kind = "timeout"


class RateLimited(RetryableError):
    kind = "rate_limited"
    charged = False


class Overloaded(RetryableError):
    kind = "overloaded"
    charged = False


class NoCapacity(RetryableError):
    kind = "no_capacity"
    charged = False


class SchemaVersionUnavailable(RetryableError):
    """The job was enqueued under a schema version this worker does not have (a rolling
    schema upgrade): put back for a worker that has it, never run under another version."""

    kind = "schema_version_unavailable"
    charged = False


class StoreUnavailable(RetryableError):
    """The results store did not answer (refused, reset, timed out). Says the driver's error
    by its type name only: its text can quote the SQL and the document's values."""

    kind = "store_unavailable"
    charged = False


class ServerError(RetryableError):
    kind = "server_error"


class TimeLimitExceeded(RetryableError):
    kind = "time_limit"


class PermanentError(MedqError):
    kind = "permanent"


class WorkerLost(PermanentError):
    kind = "worker_lost"


class InvalidRecord(PermanentError):
    kind = "invalid_record"


class PayloadMissing(PermanentError):
    kind = "payload_missing"


class UnknownSchema(PermanentError):
    kind = "unknown_schema"


class SchemaUnavailable(PermanentError):
    """No live worker has the job's schema version loaded (``medq.state.fleet``), this one
    included: handing it on would only bounce it. Permanent until a worker with that
    version starts; then plain ``medq requeue`` takes it (``medq.state.jobs.requeue``)."""

    kind = "schema_unavailable"


class SchemaError(PermanentError):
    kind = "schema_error"


class RequestRejected(PermanentError):
    kind = "request_rejected"


class EndpointMisconfigured(PermanentError):
    """Every job would fail the same way until the endpoint is fixed; then they can run again."""

    kind = "endpoint_misconfigured"


class ModelNotFound(EndpointMisconfigured):
    kind = "model_not_found"


class PromptTruncated(EndpointMisconfigured):
    """``read_tokens``: how many prompt tokens the server says it read (its context, about)."""

    kind = "prompt_truncated"

    def __init__(self, message: str, read_tokens: int = 0) -> None:
        super().__init__(message)
        self.read_tokens = read_tokens

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.message, self.read_tokens))


class ContextExceeded(EndpointMisconfigured):
    """The server refused a prompt longer than its context. ``context_tokens``: the size
    it said it has (llama.cpp's ``n_ctx``, "maximum context length is N"), or 0. The
    processor learns it and sends the note again in pieces; a job fails with it only
    when even a piece cannot fit (the prompt without the note is too long)."""

    kind = "context_exceeded"

    def __init__(self, message: str, context_tokens: int = 0) -> None:
        super().__init__(message)
        self.context_tokens = context_tokens

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.message, self.context_tokens))


class OutputInvalid(PermanentError):
    kind = "output_invalid"


class OutputTruncated(PermanentError):
    kind = "output_truncated"


class RedisFull(MedqError):
    """Redis is at its ``maxmemory`` and refuses writes. ``sent``: jobs whose message went
    out before it filled; a re-run of the same enqueue sends the rest, nothing twice."""

    kind = "redis_full"

    def __init__(self, message: str, sent: int = 0) -> None:
        super().__init__(message)
        self.sent = sent

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.message, self.sent))


class InvalidBatchId(MedqError, ValueError):
    """Refused at enqueue: batch ids are part of job ids and key names, so they are kept
    to a plain alphabet (``medq.core.contract.BATCH_ID_PATTERN``)."""

    kind = "invalid_batch_id"


class InputError(MedqError, ValueError):
    """The input has problems; ``problems`` says which, with line numbers. Its items are
    ``producer.records.RecordProblem``s (typed loosely: medq.core imports nothing above it)."""

    kind = "invalid_input"

    def __init__(self, problems: list[Any]) -> None:
        self.problems = problems
        head = "; ".join(str(p) for p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"{len(problems)} invalid record(s): {head}{more}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.problems,))


class UploadExpired(MedqError, RuntimeError):
    """Staged records were gone when their jobs were written (the upload outlived its TTL)."""

    kind = "upload_expired"


class OperatorError(MedqError):
    """Not a job's error: the person running medq must act. Caught by the command that
    raised it, which prints the message and exits non-zero."""

    kind = "operator_error"


class RemoteEndpointRefused(OperatorError):
    """An endpoint outside the private network, not allowed by the settings (medq.core.privacy)."""

    kind = "remote_endpoint_refused"


class WaitTimeout(OperatorError):
    """A wait for a batch ran past its timeout; ``unfinished`` jobs had not finished."""

    kind = "wait_timeout"

    def __init__(self, unfinished: int) -> None:
        super().__init__(f"{unfinished} job(s) unfinished")
        self.unfinished = unfinished

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.unfinished,))


BATCH_GONE_CAUSES = (
    "purged (medq purge), expired (MEDQ_RESULTS_TTL_S after it finished), or lost when Redis "
    "restarted without persistence (or crashed with writes not yet on disk)"
)
"""Why a batch's job states can be gone from Redis: every message that says so names all three."""


class BatchGone(OperatorError):
    """The job states of ``batch`` are gone from Redis: ``known`` jobs were seen (or enqueued),
    ``left`` of them still have a state; ``known`` 0 when the batch was never seen at all.
    Whoever waits on the batch says so instead of calling it finished. ``note``: what this
    Redis says of itself (restarted meanwhile, keeps nothing on disk), when it says it."""

    kind = "batch_gone"

    def __init__(self, batch: str, known: int = 0, left: int = 0, note: str = "") -> None:
        if known:
            head = (f"batch {batch}: the state of {known - left} of its {known} job(s) is gone from Redis, "
                    "so the batch is NOT finished; its jobs were ")
        else:
            head = f"no jobs in batch {batch!r}: never enqueued in this Redis, or its job states were "
        super().__init__(head + BATCH_GONE_CAUSES + (f" ({note})" if note else ""))
        self.batch, self.known, self.left, self.note = batch, known, left, note

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.batch, self.known, self.left, self.note))


class ToolError(OperatorError, RuntimeError):
    """A medq tool (the demo, the bench, the embedded model) cannot go on; the message says what to do.
    Also a RuntimeError, as each of these was before they joined the tree."""

    kind = "tool_error"


class DemoError(ToolError):
    """Something the demo or the bench needs is missing; the message says what to do."""

    kind = "demo_error"


class LocalModelError(ToolError):
    """The embedded model cannot be started; the message says what to install or fix."""

    kind = "local_model_error"


class PartsError(ToolError):
    """The parts are missing or do not join into the published file; the message says what to reinstall."""

    kind = "parts_error"
