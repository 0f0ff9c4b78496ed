"""Every error medq raises on purpose, as one tree with one root.

    MedqError
    ├── RetryableError            the same call may succeed later; retried with backoff
    │   ├── EndpointUnavailable   connection refused / reset, DNS
    │   ├── EndpointTimeout       no answer within the timeout
    │   ├── RateLimited           HTTP 429; carries the server's Retry-After
    │   └── ServerError           HTTP 5xx (Ollama's "queue full" and "loading model" included)
    └── PermanentError            retrying cannot help; the job goes to dead letters at once
        ├── InvalidRecord         the record itself is unusable (empty, too large, bad UTF-8)
        ├── PayloadMissing        the stored record expired (MEDQ_PAYLOAD_TTL_S) or was purged
        ├── UnknownSchema         no schema by that name
        ├── SchemaError           a schema file is malformed
        ├── RequestRejected       HTTP 4xx other than 429: the request is wrong for the endpoint
        ├── OutputInvalid         still not valid JSON for the schema after the re-asks
        └── OutputTruncated       still cut off at max_tokens_cap

A job whose retryable error outlives its retry budget fails with that error's kind.
Messages name a record by its id, never by its text, and never repeat the model's
output or a validation error's input values: they end up in logs and in Flower.
"""

from __future__ import annotations


class MedqError(Exception):
    kind = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # picklable/serialisable with its message only
        return (self.__class__, (self.message,))


class RetryableError(MedqError):
    kind = "retryable"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return (self.__class__, (self.message, self.retry_after_s))


class EndpointUnavailable(RetryableError):
    kind = "endpoint_unavailable"


class EndpointTimeout(RetryableError):
    kind = "timeout"


class RateLimited(RetryableError):
    kind = "rate_limited"


class ServerError(RetryableError):
    kind = "server_error"


class PermanentError(MedqError):
    kind = "permanent"


class InvalidRecord(PermanentError):
    kind = "invalid_record"


class PayloadMissing(PermanentError):
    kind = "payload_missing"


class UnknownSchema(PermanentError):
    kind = "unknown_schema"


class SchemaError(PermanentError):
    kind = "schema_error"


class RequestRejected(PermanentError):
    kind = "request_rejected"


class OutputInvalid(PermanentError):
    kind = "output_invalid"


class OutputTruncated(PermanentError):
    kind = "output_truncated"
