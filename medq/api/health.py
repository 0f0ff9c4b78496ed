"""``/healthz`` and ``/metrics``: for the operator's probes and Prometheus. No token needed;
neither says anything about any record."""

from __future__ import annotations

import redis
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from medq.api.deps import ApiState, api_state
from medq.api.models import Health

router = APIRouter(tags=["operations"])

_METRICS_200 = {"content": {"text/plain": {"schema": {"type": "string"}}},
                "description": "Prometheus text format: medq's metrics and this service's requests."}


@router.get("/healthz", response_model=Health,
            responses={503: {"model": Health, "description": "Redis cannot be reached."}})
def healthz(state: ApiState = Depends(api_state)) -> JSONResponse:
    """Redis reachable, and how many worker processes were seen lately. No token needed."""
    try:
        workers = state.stats.live_workers()
    except redis.RedisError:
        return JSONResponse({"status": "redis_unreachable", "redis": False, "workers": 0}, status_code=503)
    return JSONResponse({"status": "ok" if workers else "no_workers", "redis": True, "workers": workers})


@router.get("/metrics", response_class=Response, responses={200: _METRICS_200})
def metrics(state: ApiState = Depends(api_state)) -> Response:
    """Prometheus metrics (no token needed): medq's own series, as `medq metrics` serves them, and
    medq_api_requests_total / medq_api_request_seconds by route template and status."""
    return Response(generate_latest(state.stats.registry), media_type=CONTENT_TYPE_LATEST)
