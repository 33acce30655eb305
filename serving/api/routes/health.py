"""Health: ``/health`` (alive), ``/health/detailed`` (every dependency), ``/health/ready``.

Never behind an API key, so probes keep working when keys or Redis do not. ``/health/ready``
and BentoML's ``/readyz`` run the same checks (``serving.health.check_service``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from serving.api.deps import OptionalBackend
from serving.health import check_service, is_ready, overall_status
from serving.workerstates import aggregate_states, read_states, state_dir

router = APIRouter(prefix="/health", tags=["health"])


async def _no_operations() -> dict[str, dict[str, Any]]:
    return {}


@router.get("", summary="liveness")
async def health() -> JSONResponse:
    """The process answers; nothing else is checked."""
    return JSONResponse({"status": "healthy"})


@router.get("/detailed", summary="every dependency and the worker's operations")
async def health_detailed(backend: OptionalBackend) -> JSONResponse:
    """The model, the database and Redis, each with its latency; the rate limiter's and
    prediction log's state in this worker (``operations``) and across every API worker
    (``api_workers``: totals, and which workers are degraded or stale). ``degraded`` when any
    is unhealthy."""
    operations = backend.operations if backend is not None else None
    results, reports = await asyncio.gather(
        check_service(backend.predict_proba if backend is not None else None),
        operations.health() if operations is not None else _no_operations(),
    )
    degraded = any(report.get("status") != "ok" for report in reports.values())
    body: dict[str, Any] = {"status": "healthy", "checks": {r.name: r.as_dict() for r in results}}
    if reports:
        body["operations"] = reports
        directory = state_dir()
        others = await asyncio.to_thread(read_states, directory) if directory is not None else []
        body["api_workers"] = aggregate_states(reports, others)
        degraded = degraded or body["api_workers"]["status"] != "ok"
    body["status"] = "degraded" if degraded else overall_status(results)
    return JSONResponse(body)


@router.get(
    "/ready",
    summary="readiness",
    responses={503: {"description": "not ready: a required check failed"}},
)
async def health_ready(backend: OptionalBackend) -> JSONResponse:
    """200 when every required check passes (the model always; Redis when limits fail
    closed), else 503. An unreachable database degrades but does not block readiness."""
    results = await check_service(backend.predict_proba if backend is not None else None)
    ready = is_ready(results)
    body = {"ready": ready, "checks": {r.name: r.as_dict() for r in results}}
    return JSONResponse(body, status_code=200 if ready else 503)
