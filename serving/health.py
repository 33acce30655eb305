"""Dependency checks behind ``/health/detailed``, ``/health/ready`` and BentoML's ``/readyz``.

:func:`check_service` is the one readiness: the route and the service's ``__is_ready__``
both call it, so ``/health/ready`` and ``/readyz`` cannot disagree.

Each check reports a status and how long it took; a check never raises. Only the model
blocks readiness unconditionally. An unreachable database degrades the service but leaves
it ready: keys already seen are judged by their last known state and the prediction log
journals to disk until it returns, so taking replicas out of rotation would lose more than
it saves. Redis is checked only when ``REDIS_URL`` is set, and blocks readiness only when
rate limits fail closed without it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

import anyio.to_thread
import numpy as np

from core.observation import FIELD_NAMES
from core.settings import get_settings

logger = logging.getLogger(__name__)

Status = Literal["healthy", "unhealthy", "not_configured"]
CHECK_TIMEOUT_S = 2.0
_PROBE_ROW = np.array([[28.0, 85.0, 50.0] + [np.nan] * (len(FIELD_NAMES) - 3)])
PredictProba = Callable[[np.ndarray], Awaitable[np.ndarray]]


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    latency_ms: float
    required: bool
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": self.status,
            "latency_ms": round(self.latency_ms, 3),
            "required": self.required,
        }
        if self.detail:
            out["detail"] = self.detail
        return out

    @property
    def blocks_readiness(self) -> bool:
        return self.required and self.status != "healthy"


async def run_check(name: str, probe: Callable[[], Awaitable[None]], *, required: bool) -> CheckResult:
    start = time.perf_counter()
    try:
        await asyncio.wait_for(probe(), timeout=CHECK_TIMEOUT_S)
    except Exception as exc:  # a health check reports failures, it does not raise them
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return CheckResult(name, "unhealthy", _ms_since(start), required, detail)
    return CheckResult(name, "healthy", _ms_since(start), required)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


@functools.cache
def _engine(url: str) -> Any:
    from sqlalchemy import create_engine

    return create_engine(url, pool_pre_ping=True, pool_size=1, max_overflow=1)


async def ping_database(url: str) -> None:
    from sqlalchemy import text

    def ping() -> None:
        with _engine(url).connect() as conn:
            conn.execute(text("SELECT 1"))

    await anyio.to_thread.run_sync(ping, abandon_on_cancel=True)


async def ping_redis(url: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url, socket_timeout=CHECK_TIMEOUT_S)
    try:
        await cast(Awaitable[Any], client.ping())
    finally:
        await client.aclose()


async def check_dependencies(
    model_probe: Callable[[], Awaitable[None]],
    *,
    database_url: str,
    redis_url: str | None,
    redis_required: bool = True,
) -> list[CheckResult]:
    checks = [
        run_check("model", model_probe, required=True),
        run_check("database", functools.partial(ping_database, database_url), required=False),
    ]
    if redis_url:
        probe = functools.partial(ping_redis, redis_url)
        checks.append(run_check("redis", probe, required=redis_required))
    results = list(await asyncio.gather(*checks))
    if not redis_url:
        results.append(CheckResult("redis", "not_configured", 0.0, required=False))
    return results


def overall_status(results: list[CheckResult]) -> Literal["healthy", "degraded"]:
    return "healthy" if all(r.status != "unhealthy" for r in results) else "degraded"


async def check_service(predict_proba: PredictProba | None) -> list[CheckResult]:
    """Every check, the model probed through the same path as a prediction (None: no model)."""

    async def probe_model() -> None:
        if predict_proba is None:
            raise RuntimeError("model is not loaded")
        await predict_proba(_PROBE_ROW)

    settings = get_settings()
    return await check_dependencies(
        probe_model,
        database_url=settings.effective_database_url,
        redis_url=settings.redis_url,
        # Failing open, the service keeps serving without Redis: a replica that is not
        # ready would be taken out of rotation for nothing (all replicas share Redis).
        redis_required=settings.rate_limit_policy == "fail-closed",
    )


def is_ready(results: list[CheckResult]) -> bool:
    return not any(r.blocks_readiness for r in results)


# The only words a public health answer may contain: statuses and modes. Anything else a
# report carries as text (driver errors naming hosts, journal paths, problems) is for
# admin keys only. A whitelist, so a field added later stays private until named here.
PUBLIC_WORDS = frozenset(
    {
        "healthy",
        "unhealthy",
        "not_configured",
        "degraded",
        "ok",
        "durable",
        "async",
        "fail-open",
        "fail-closed",
        # The limiter's store, by scheme alone.
        "memory",
        "redis",
        "rediss",
        "unix",
    }
)


_DROPPED = object()


def public_view(value: Any) -> Any:
    """``value`` (a health body) without free text: numbers, booleans and
    :data:`PUBLIC_WORDS` are kept; other strings, and lists holding any, are dropped."""
    if isinstance(value, dict):
        kept = {key: public_view(item) for key, item in value.items()}
        return {key: item for key, item in kept.items() if item is not _DROPPED}
    if isinstance(value, list):
        items = [public_view(item) for item in value]
        return _DROPPED if any(item is _DROPPED for item in items) else items
    if isinstance(value, str):
        return value if value in PUBLIC_WORDS else _DROPPED
    return value
