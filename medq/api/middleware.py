"""``medq api``'s own ASGI layers: the access log and request metrics (``AccessGuard``),
and the time a request's body may take to arrive (``BodyDeadline``).

The access log names the route template, never the path, the query or the body: paths
hold batch and job ids, and bodies hold notes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import kombu.exceptions
import redis
from prometheus_client import CollectorRegistry, Counter, Histogram

from medq.api.errors import APIError
from medq.core.errors import RedisFull
from medq.core.settings import Settings
from medq.state.metrics import live_workers
from medq.state.prometheus import MedqCollector

log = logging.getLogger("medq.api")


class Stats:
    """The service's Prometheus registry (medq's series plus its own) and the worker count."""

    def __init__(self, settings: Settings, r: redis.Redis) -> None:
        self.r = r
        self.registry = CollectorRegistry()
        endpoints = [ep.url for ep in settings.llm.all_endpoints]
        self.registry.register(MedqCollector(r, endpoints, settings.llm.max_in_flight))
        self.requests = Counter("medq_api_requests", "HTTP requests by route template, method and status.",
                                ["route", "method", "status"], registry=self.registry)
        self.seconds = Histogram("medq_api_request_seconds", "HTTP request time by route template.", ["route"],
                                 registry=self.registry)

    def live_workers(self) -> int:
        return live_workers(self.r)


class AccessGuard:
    """Outermost of the app's own layers: the access log (route template, status, time,
    client; never a path, query or body), request metrics, and errors that escaped a route
    answered without their message (logged by type only)."""

    def __init__(self, app: Any, stats: Stats) -> None:
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
            code, detail = _escaped(exc)
            log.error("%s %s failed: %s", scope["method"], route_of(scope), type(exc).__name__)
            if status == 0:
                status = code
                body = json.dumps({"detail": detail, "problems": []}).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": code, "headers": headers})
                await send({"type": "http.response.body", "body": body})
        finally:
            route = route_of(scope)
            elapsed = time.perf_counter() - started
            client = scope.get("state", {}).get("client", "-")
            log.info("%s %s %d %.0fms client=%s", scope["method"], route, status, elapsed * 1000, client)
            self.stats.requests.labels(route, scope["method"], str(status)).inc()
            self.stats.seconds.labels(route).observe(elapsed)


def _escaped(exc: Exception) -> tuple[int, str]:
    """The status and message for an error no route answered: Redis away or full is a 503
    the client can retry; anything else a 500 that names only the error's type."""
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, kombu.exceptions.OperationalError)):
        return 503, "cannot reach Redis (MEDQ_REDIS_URL); try again"
    if isinstance(exc, RedisFull):  # the jobs not sent are sent by the same request again
        return 503, exc.message.replace("run the same command again", "send the same request again")
    return 500, f"internal error ({type(exc).__name__}); the service log has the request"


class BodyDeadline:
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


def route_of(scope: dict[str, Any]) -> str:
    """The route template the request matched (``/v1/jobs/{job_id}``), never its path."""
    route = scope.get("route")
    return getattr(route, "path", None) or "(no route)"
