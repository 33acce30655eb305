"""API keys, rate limits and the prediction log as one API worker runs them.

One :class:`EdgeOperations` per API worker, created when the worker starts and closed when
it stops (the close flushes the prediction log). The edge's dependencies
(``serving.api.deps``) call it; it refuses with domain exceptions (``core.errors``) and
the edge chooses their status codes.

The key check is synchronous and may wait on the network (a cache miss asks the database;
an unreachable PostgreSQL costs its connect timeout), so a miss runs in the thread pool; a
cached key is microseconds and runs inline. The rate limiter is async on the worker's loop.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import anyio.to_thread
from prometheus_client import Counter

from core.errors import AuthenticationError, DependencyUnavailableError, RateLimitedError, TooLargeError
from core.settings import Settings, get_settings
from ops.keys import ApiKeyInfo, ApiKeyStore, extract_api_key, key_id_of
from ops.predictionlog import PredictionGroup, PredictionLog
from ops.ratelimit import RateLimitDecision, RateLimiter, Window, parse_limit_setting
from serving.metrics import get_metrics

logger = logging.getLogger(__name__)

# Client addresses this worker remembers as over their failed-auth limit; the oldest are
# forgotten first, which at worst lets one more guess reach the shared counter.
_THROTTLED_ADDRESSES = 10_000
# A throttled address may still present a real key this worker has not cached (another
# client behind the same NAT): its id must be in the list of active key ids, re-read at
# most this often when an id is missing from it, and each (address, id) gets one lookup.
_KEY_IDS_REFRESH_S = 5.0
_THROTTLED_LOOKUPS = 10_000


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
        auth_failure_windows: list[Window],
    ) -> None:
        self.keys = keys
        self.limiter = limiter
        self.log = log
        self._auth_failure_windows = auth_failure_windows
        self._throttled: OrderedDict[str, float] = OrderedDict()  # address -> monotonic until
        self._throttled_lookups: OrderedDict[tuple[str, str], float] = OrderedDict()  # -> until
        self._key_ids: frozenset[str] = frozenset()
        self._key_ids_read_at = float("-inf")
        metrics = get_metrics()
        self._exports = [
            _CounterExport(lambda: limiter.fallback_decisions, metrics.ratelimit_fallback_decisions),
            _CounterExport(lambda: limiter.redis_failures, metrics.ratelimit_redis_failures),
            _CounterExport(lambda: log.rows_journaled, metrics.prediction_log_journaled_rows),
            _CounterExport(lambda: log.rows_rejected, metrics.prediction_log_rejected_rows),
            _CounterExport(lambda: log.lines_quarantined, metrics.prediction_log_quarantined_lines),
            _CounterExport(lambda: log.rows_refused, metrics.prediction_log_refused_rows),
            _CounterExport(lambda: log.writer_restarts, metrics.prediction_log_writer_restarts),
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
        auth_failure_windows = parse_limit_setting("AUTH_FAILURE_LIMIT", settings.auth_failure_limit)
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
        return cls(keys=keys, limiter=limiter, log=log, auth_failure_windows=auth_failure_windows)

    # -- request path -----------------------------------------------------------------

    async def authenticate(self, headers: Mapping[str, str], *, client: str) -> ApiKeyInfo | None:
        """The request's key, or None when keys are off (bypass); refuses with
        ``AuthenticationError``, with ``RateLimitedError`` once ``client`` (its address) has
        failed AUTH_FAILURE_LIMIT times, or, when the database is needed and down,
        ``DependencyUnavailableError``.

        A throttled address is still answered for a key this worker has cached as valid, and
        a real key it has not cached gets one lookup (clients behind one NAT share the
        address); any other key from it is refused unchecked.
        """
        if self.keys is None:
            return None
        raw_key = extract_api_key(headers)
        try:
            # A cached answer costs microseconds, far less than a hop to the thread pool.
            info = self.keys.verify_cached_key(raw_key)
            if info is None:
                assert raw_key is not None  # verify_cached_key refuses a missing key
                wait_s = self._throttle_wait(client)
                if wait_s is not None and not await self._admit_while_throttled(client, raw_key):
                    get_metrics().auth_throttled.inc()
                    raise self._auth_throttle_refusal(wait_s)
                info = await anyio.to_thread.run_sync(self.keys.verify_key, raw_key)
        except AuthenticationError as exc:
            get_metrics().auth_refusals.labels(reason=exc.reason).inc()
            await self._count_auth_failure(client)
            raise
        except DependencyUnavailableError:
            get_metrics().auth_refusals.labels(reason="unavailable").inc()
            raise
        return info

    def _throttle_wait(self, client: str) -> float | None:
        """Seconds ``client`` stays over its failed-auth limit, None when it is not."""
        until = self._throttled.get(client)
        if until is None:
            return None
        wait_s = until - time.monotonic()
        if wait_s <= 0:
            del self._throttled[client]
            return None
        return wait_s

    async def _admit_while_throttled(self, client: str, raw_key: str) -> bool:
        """Whether a throttled ``client``'s uncached key may still be looked up: its id is an
        active key's, and this (address, id) has not had its lookup in this throttle."""
        assert self.keys is not None
        key_id = key_id_of(raw_key)
        if key_id is None:
            return False
        looked_up_until = self._throttled_lookups.get((client, key_id))
        if looked_up_until is not None and looked_up_until > time.monotonic():
            return False
        if key_id not in self._key_ids and time.monotonic() - self._key_ids_read_at >= _KEY_IDS_REFRESH_S:
            # Set before the read: requests arriving meanwhile use the list as it is.
            self._key_ids_read_at = time.monotonic()
            # Unreachable, the last list stands: the lookup itself would fail too.
            with contextlib.suppress(DependencyUnavailableError):
                self._key_ids = await anyio.to_thread.run_sync(self.keys.active_key_ids)
        if key_id not in self._key_ids:
            return False
        self._throttled_lookups[client, key_id] = self._throttled[client]  # this throttle's end
        self._throttled_lookups.move_to_end((client, key_id))
        while len(self._throttled_lookups) > _THROTTLED_LOOKUPS:
            self._throttled_lookups.popitem(last=False)
        return True

    async def _count_auth_failure(self, client: str) -> None:
        """Charge one failure to ``client``; past the limit, refuse it from now on."""
        decision = await self.limiter.hit_windows(f"auth-failures:{client}", self._auth_failure_windows)
        if decision.allowed:
            return
        wait_s = float(decision.retry_after or 1)
        self._throttled[client] = time.monotonic() + wait_s
        self._throttled.move_to_end(client)
        while len(self._throttled) > _THROTTLED_ADDRESSES:
            self._throttled.popitem(last=False)
        logger.warning("client %s is over its failed-authentication limit for %.0f s", client, wait_s)
        get_metrics().auth_throttled.inc()
        raise self._auth_throttle_refusal(wait_s)

    @staticmethod
    def _auth_throttle_refusal(wait_s: float) -> RateLimitedError:
        retry_after = str(max(1, round(wait_s)))
        return RateLimitedError(
            f"too many failed authentications from this address; retry after {retry_after} s",
            headers={"Retry-After": retry_after},
        )

    async def charge(self, key: ApiKeyInfo, *, route: str, rows: int) -> dict[str, str]:
        """Take this request's cost from the key's limits; the rate-limit headers to send.

        Refuses with ``RateLimitedError``, ``TooLargeError`` (one request costs more than the
        whole limit: waiting cannot help) or ``DependencyUnavailableError`` (fail-closed).
        """
        cost = self.limiter.cost_for(route, rows)
        try:
            decision = await self.limiter.hit(key.key_id, key.tier, cost=cost)
        finally:
            self._sync_counters()
        headers = decision.headers()
        if not decision.allowed:
            get_metrics().rate_limited.labels(tier=key.tier).inc()
            raise self._limit_refusal(decision, cost=cost, tier=key.tier, headers=headers)
        return headers

    @staticmethod
    def _limit_refusal(
        decision: RateLimitDecision, *, cost: int, tier: str, headers: dict[str, str]
    ) -> TooLargeError | RateLimitedError:
        if decision.cost_too_high:
            return TooLargeError(
                f"this request costs {cost}, more than tier {tier}'s limit of {decision.limit}; "
                "send fewer observations per batch",
                code="cost_exceeds_limit",
                headers=headers,
            )
        return RateLimitedError(
            f"rate limit of {decision.limit} for tier {tier} reached; retry after {decision.retry_after} s",
            headers=headers,
        )

    async def record(self, group: PredictionGroup) -> None:
        """Log one request's rows; in durable mode, once this returns they are fsynced or
        committed (``PredictionLogUnavailableError`` when nothing can take them)."""
        try:
            await self.log.commit(group)
        finally:
            self._sync_counters()

    def _sync_counters(self) -> None:
        for export in self._exports:
            export.sync()

    # -- health and lifecycle ---------------------------------------------------------

    async def health(self) -> dict[str, dict[str, Any]]:
        """Rate limiter (pings Redis) and prediction log state for ``/health/detailed``."""
        limiter = await self.limiter.health()
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
