"""How ``medq api`` answers an error: always ``{"detail", "problems"[, "problem_count"]}``,
whoever raised it (a route, FastAPI's validation, Starlette's 404 and 405).

Validation errors go back with the place and the reason only: pydantic's errors carry the
input, which may be a record's text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from medq.core.errors import MedqError

_T = TypeVar("_T")


class APIError(MedqError):
    """An answer with a status and a message (and per-record problems).

    A ``MedqError`` like every error medq raises on purpose; it never leaves the service:
    the handler below turns it into the answer. ``message`` and ``detail`` are the same text."""

    kind = "api_error"

    def __init__(self, status: int, detail: str, problems: list[dict[str, Any]] | None = None,
                 problem_count: int | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.problems, self.problem_count = status, detail, problems, problem_count
        self.headers = headers

    def __reduce__(self):  # type: ignore[no-untyped-def]  # as MedqError's: every argument, not the message only
        return (self.__class__, (self.status, self.detail, self.problems, self.problem_count, self.headers))


def opened(fetch: Callable[[], _T]) -> _T:
    """``fetch()``; results that cannot be opened (MEDQ_ENCRYPTION_KEY missing or wrong
    here) are a 500 that says why."""
    try:
        return fetch()
    except APIError:  # a MedqError too, but an answer already
        raise
    except MedqError as exc:
        raise APIError(500, exc.message) from None


async def api_error(request: Request, exc: APIError) -> JSONResponse:
    body: dict[str, Any] = {"detail": exc.detail, "problems": exc.problems or []}
    if exc.problem_count is not None:
        body["problem_count"] = exc.problem_count
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    # pydantic's errors carry the input; only the place and the reason go back.
    msgs = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()]
    return JSONResponse({"detail": "; ".join(msgs) or "invalid request", "problems": []}, status_code=422)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"detail": str(exc.detail), "problems": []}, status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


def install_error_handlers(app: FastAPI) -> None:
    # Starlette types a handler for any Exception; each of these is registered for its own.
    app.add_exception_handler(APIError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
