"""Health: ``/health`` (alive), ``/health/detailed`` (every dependency), ``/health/ready``.

Never behind an API key, so probes keep working when keys or Redis do not. ``/health/ready``
and BentoML's ``/readyz`` run the same checks (``serving.health.check_service``).

Without a key the answers are public: statuses, latencies and counts, no hosts, paths or
driver errors (``serving.health.public_view``). A key of a HEALTH_DETAIL_TIERS tier (admin)
sees everything; a key that does not verify is refused (401) like anywhere else.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from core.settings import get_settings
from ops.keys import extract_api_key
from serving.api.deps import OptionalBackend, client_address
from serving.health import check_service, is_ready, overall_status, public_view
from serving.workerstates import aggregate_states, read_states, state_dir

router = APIRouter(prefix="/health", tags=["health"])


async def full_detail(request: Request, backend: OptionalBackend) -> bool:
    """Whether this request may see the full health detail (an admin-tier key)."""
    if backend is None or extract_api_key(request.headers) is None:
        return False
    operations = backend.operations
    if operations is None or operations.keys is None:
        return True  # keys are off (AUTH_BYPASS_ENABLED, development only): nothing to hide behind
    info = await operations.authenticate(request.headers, client=client_address(request))
    return info is not None and info.tier in get_settings().health_detail_tiers


FullDetail = Annotated[bool, Depends(full_detail)]


def _answer(body: dict[str, Any], *, full: bool, status_code: int = 200) -> JSONResponse:
    return JSONResponse(body if full else public_view(body), status_code=status_code)


async def _no_operations() -> dict[str, dict[str, Any]]:
    return {}


@router.get("", summary="liveness")
async def health() -> JSONResponse:
    """The process answers; nothing else is checked."""
    return JSONResponse({"status": "healthy"})


@router.get("/detailed", summary="every dependency and the worker's operations")
async def health_detailed(backend: OptionalBackend, full: FullDetail) -> JSONResponse:
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
    return _answer(body, full=full)


@router.get(
    "/ready",
    summary="readiness",
    responses={503: {"description": "not ready: a required check failed"}},
)
async def health_ready(backend: OptionalBackend, full: FullDetail) -> JSONResponse:
    """200 when every required check passes (the model always; Redis when limits fail
    closed), else 503. An unreachable database degrades but does not block readiness."""
    results = await check_service(backend.predict_proba if backend is not None else None)
    ready = is_ready(results)
    body = {"ready": ready, "checks": {r.name: r.as_dict() for r in results}}
    return _answer(body, full=full, status_code=200 if ready else 503)
