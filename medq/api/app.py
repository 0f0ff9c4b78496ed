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

This module only wires the app: the routes are in one router a file (``jobs``,
``uploads``, ``batches``, ``schemas``, ``health``), the bodies in ``models``, the token
check in ``auth``, the answers to errors in ``errors``, the log and time limits in
``middleware``; what the routes share is ``deps.ApiState``, in ``app.state.api``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from medq.api import batches, health, jobs, schemas, uploads
from medq.api.auth import token_digests
from medq.api.deps import ApiState
from medq.api.errors import install_error_handlers
from medq.api.middleware import AccessGuard, BodyDeadline, Stats
from medq.api.models import with_schema_names
from medq.core.settings import Settings
from medq.state.results import open_store_for
from producer.enqueue import Producer

DESCRIPTION = (
    "Every /v1 route needs `Authorization: Bearer <token>` (MEDQ_API__TOKENS). A batch belongs to the "
    "client that created it. Record text is stored encrypted when MEDQ_ENCRYPTION_KEY is set, travels "
    "to workers only by job id, and is never logged or echoed in errors."
)


def create_app(settings: Settings, *, insecure_no_auth: bool = False) -> FastAPI:
    """The service. Raises ``ValueError`` when ``MEDQ_API__TOKENS`` is missing or malformed
    (unless ``insecure_no_auth``)."""
    raw = settings.api.tokens.get_secret_value() if settings.api.tokens else ""
    digests = token_digests(raw, insecure_no_auth)
    app = FastAPI(
        title="medq",
        version="1",
        summary="Enqueue clinical notes for structured extraction by a local LLM, and read the results.",
        description=DESCRIPTION,
    )
    producer = Producer(settings)
    names = producer.schema_loader.names()  # SchemaError before any store is opened
    state = ApiState(settings=settings, producer=producer, store=open_store_for(settings),
                     stats=Stats(settings, producer.r), token_digests=digests)
    app.state.api = state
    app.state.token_digests = digests  # None: no tokens (`medq api` warns)
    app.add_middleware(BodyDeadline, timeout_s=settings.api.body_timeout_s)  # inside AccessGuard: its 408 is logged
    app.add_middleware(AccessGuard, stats=state.stats)
    install_error_handlers(app)
    for module in (jobs, uploads, batches, schemas, health):  # the order of the OpenAPI paths
        app.include_router(module.router)
    _document_schema_names(app, names)
    return app


def _document_schema_names(app: FastAPI, names: list[str]) -> None:
    """The loaded schemas go into the OpenAPI as the ``schema`` enums; the routers are
    modules, shared by every app, so their document is amended per app instead."""

    def openapi() -> dict[str, Any]:
        return with_schema_names(FastAPI.openapi(app), names)

    app.openapi = openapi  # type: ignore[method-assign]
