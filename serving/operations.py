"""API keys, rate limits and the prediction log as the HTTP edge runs them.

One :class:`EdgeOperations` per API worker, created when the worker starts and closed when
it stops (the close flushes the prediction log). Its methods are the guard, charge and
listener of :mod:`serving.hooks`; the status codes for ops refusals are chosen here:
401 for a key, 429 (or 413 when one request costs more than the whole limit) for a rate
limit, 503 when a dependency needed to decide is down.

The key check and a Redis rate-limit call are synchronous and may wait on the network (a
cache miss asks the database; an unreachable PostgreSQL costs its connect timeout), so
they run in the thread pool; a cached key and the in-process limiter are microseconds and
run inline.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import anyio.to_thread
from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from core.errors import AuthenticationError, DependencyUnavailableError
from core.settings import Settings, get_settings
from ops.keys import ApiKeyInfo, ApiKeyStore, extract_api_key
from ops.predictionlog import PredictionLog, PredictionRecord
from ops.ratelimit import RateLimitDecision, RateLimiter
from serving.hooks import EdgeHooks, edge_headers
from serving.metrics import get_metrics

logger = logging.getLogger(__name__)

T = TypeVar("T")
_AUTH_CHALLENGE = 'Bearer realm="flood-risk", charset="UTF-8"'
_RETRY_AFTER_UNAVAILABLE_S = "5"


def _refusal(status: int, message: str, *, reason: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message, "reason": reason}, status_code=status, headers=headers)


class _CounterExport:
    """Carries a process-local running total into a multiprocess Prometheus counter."""

    def __init__(self, read: Callable[[], int], counter: Counter) -> None:
        self._read = read
        self._counter = counter
        self._exported = 0
        self._lock = threading.Lock()

    def sync(self) -> None:
        with self._lock:
            current = self._read()
            if current > self._exported:
                self._counter.inc(current - self._exported)
                self._exported = current


class EdgeOperations:
    """The ops objects one API worker uses, and the hooks that apply them to requests."""

    def __init__(
        self,
        *,
        keys: ApiKeyStore | None,
        limiter: RateLimiter,
        log: PredictionLog,
    ) -> None:
        self.keys = keys
        self.limiter = limiter
        self.log = log
        metrics = get_metrics()
        self._exports = [
            _CounterExport(lambda: limiter.fallback_decisions, metrics.ratelimit_fallback_decisions),
            _CounterExport(lambda: limiter.redis_failures, metrics.ratelimit_redis_failures),
            _CounterExport(lambda: log.rows_journaled, metrics.prediction_log_journaled_rows),
        ]

    @classmethod
    def start(cls, settings: Settings | None = None) -> EdgeOperations:
        """Create the key store, limiter and prediction log from settings; start the log."""
        settings = settings or get_settings()
        if settings.auth_bypass_enabled:
            # `flood config check` refuses this in production; in development it is a choice.
            logger.warning("AUTH_BYPASS_ENABLED=true: API keys are not checked and no rate limits apply")
            keys = None
        else:
            keys = ApiKeyStore(settings=settings)
        limiter = RateLimiter(settings=settings)
        log = PredictionLog(settings=settings)
        log.start()
        logger.info(
            "edge operations: keys %s, rate limits in %s (%s), prediction log to %s",
            "off (bypass)" if keys is None else "on",
            limiter.backend,
            settings.rate_limit_policy,
            settings.effective_database_url.split("://", 1)[0],
        )
        return cls(keys=keys, limiter=limiter, log=log)

    def hooks(self) -> EdgeHooks:
        return EdgeHooks(
            guards=[self.authenticate], charges=[self.charge], listeners=[self.record], health=self.health
        )

    # -- request path -----------------------------------------------------------------

    async def authenticate(self, request: Request) -> Response | None:
        if self.keys is None:
            return None
        raw_key = extract_api_key(request.headers)
        try:
            # A cached answer costs microseconds, far less than a hop to the thread pool.
            info = self.keys.verify_cached_key(raw_key)
            if info is None:
                info = await anyio.to_thread.run_sync(self.keys.verify_key, raw_key)
        except AuthenticationError as exc:
            get_metrics().auth_refusals.labels(reason=exc.reason).inc()
            return _refusal(401, str(exc), reason=exc.reason, headers={"WWW-Authenticate": _AUTH_CHALLENGE})
        except DependencyUnavailableError as exc:
            get_metrics().auth_refusals.labels(reason="unavailable").inc()
            return _refusal(
                503, str(exc), reason="unavailable", headers={"Retry-After": _RETRY_AFTER_UNAVAILABLE_S}
            )
        request.state.api_key = info
        request.state.key_id = info.key_id
        return None

    async def charge(self, request: Request, route: str, rows: int) -> Response | None:
        info: ApiKeyInfo | None = getattr(request.state, "api_key", None)
        if info is None:  # auth bypass: limits are per key, and there is none
            return None
        cost = self.limiter.cost_for(route, rows)
        try:
            decision = await self._run(functools.partial(self.limiter.hit, info.key_id, info.tier, cost=cost))
        except DependencyUnavailableError as exc:
            return _refusal(
                503, str(exc), reason="unavailable", headers={"Retry-After": _RETRY_AFTER_UNAVAILABLE_S}
            )
        finally:
            self._sync_counters()
        headers = decision.headers()
        edge_headers(request).update(headers)
        if decision.allowed:
            return None
        get_metrics().rate_limited.labels(tier=info.tier).inc()
        return self._limit_refusal(decision, cost=cost, tier=info.tier, headers=headers)

    @staticmethod
    def _limit_refusal(
        decision: RateLimitDecision, *, cost: int, tier: str, headers: dict[str, str]
    ) -> Response:
        if decision.cost_too_high:
            return _refusal(
                413,
                f"this request costs {cost}, more than tier {tier}'s limit of {decision.limit}; "
                "send fewer observations per batch",
                reason="cost_exceeds_limit",
                headers=headers,
            )
        return _refusal(
            429,
            f"rate limit of {decision.limit} for tier {tier} reached; retry after {decision.retry_after} s",
            reason="rate_limited",
            headers=headers,
        )

    async def _run(self, call: Callable[[], T]) -> T:
        if self.limiter.backend == "memory":
            return call()
        return await anyio.to_thread.run_sync(call)

    async def record(self, _: Request, records: Sequence[PredictionRecord]) -> None:
        self.log.record_many(records)
        self._sync_counters()

    def _sync_counters(self) -> None:
        for export in self._exports:
            export.sync()

    # -- health and lifecycle ---------------------------------------------------------

    async def health(self) -> dict[str, dict[str, Any]]:
        """Rate limiter (pings Redis) and prediction log state for ``/health/detailed``."""
        limiter = await anyio.to_thread.run_sync(self.limiter.health)
        self._sync_counters()
        return {"rate_limiter": limiter, "prediction_log": self.log.health()}

    def close(self) -> None:
        """Flush the prediction log (what the database will not take stays in the journal)."""
        self.log.close()
        self._sync_counters()
        logger.info(
            "prediction log closed: %d rows inserted, %d journaled",
            self.log.rows_inserted,
            self.log.rows_journaled,
        )
