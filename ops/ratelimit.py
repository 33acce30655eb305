"""Per-key rate limits by tier, shared by every process and replica through Redis.

Sliding-window-counter limits from the ``limits`` library: its Redis storage runs each
acquisition as one Lua script, so concurrent workers cannot both take the last slot. The
moving window was measured first and dropped: it stores one Redis entry per unit of cost,
so a 256-row batch wrote 256 entries and high limits made every check scan long lists
(batch requests stalled for seconds in the benchmark); the counter is O(1) per hit and
weights the previous window, close to a moving window without its cost.

The store is a setting, a ``limits`` storage URI (RATE_LIMIT_STORAGE_URI, by default
REDIS_URL). Without either (the embedded default) it is ``memory://``: in-process, exact
for one worker and per-worker otherwise.

When the shared store is unreachable RATE_LIMIT_POLICY decides: ``fail-open`` keeps serving
with an in-process limiter (and reports itself degraded) or ``fail-closed`` refuses the
request. After a failure the store is left alone for a few seconds, so an outage costs one
connect timeout per pause rather than one per request.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from limits import RateLimitItem, parse_many
from limits.errors import StorageError
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter

from core.errors import ConfigurationError, DependencyUnavailableError
from core.settings import Settings, get_settings

logger = logging.getLogger(__name__)

DEFAULT_KEY_PREFIX = "flood-ratelimit"
# Short socket timeouts: a limiter that waits seconds on Redis is worse than one that
# falls back, and a healthy local Redis answers in well under a millisecond.
_REDIS_TIMEOUT_S = 0.25
_REDIS_RETRY_AFTER_S = 5.0


@dataclass(frozen=True)
class RateLimitDecision:
    """The outcome for one request, reported against its tightest limit."""

    allowed: bool
    limit: int
    remaining: int
    reset_at: float  # epoch seconds when the tightest window frees a slot
    retry_after: int | None  # seconds; set only when denied and waiting can help
    degraded: bool = False  # decided by the in-process fallback while Redis was down
    cost_too_high: bool = False  # the cost exceeds the limit itself; waiting cannot help

    def headers(self) -> dict[str, str]:
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(max(self.remaining, 0)),
            "X-RateLimit-Reset": str(math.ceil(self.reset_at)),
        }
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return headers


def parse_tiers(settings: Settings) -> dict[str, list[RateLimitItem]]:
    """Every configured tier's limits, shortest window first; bad notation fails at start."""
    tiers: dict[str, list[RateLimitItem]] = {}
    for name, notation in {**settings.rate_limit_tiers, "": settings.rate_limit_default}.items():
        try:
            items = parse_many(notation)
        except ValueError as exc:
            variable = "RATE_LIMIT_DEFAULT" if name == "" else "RATE_LIMIT_TIERS"
            raise ConfigurationError(
                f"{variable}: cannot parse {notation!r} for tier {name or 'default'} ({exc}); "
                'use the form "5/minute;100/hour"'
            ) from exc
        tiers[name] = sorted(items, key=lambda item: item.get_expiry())
    return tiers


class RateLimiter:
    """Takes ``cost`` from every limit of a key's tier, atomically per limit."""

    def __init__(
        self,
        *,
        settings: Settings | None = None,
        storage_uri: str | None = None,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        policy: str | None = None,
        redis_retry_seconds: float = _REDIS_RETRY_AFTER_S,
    ) -> None:
        self._settings = settings or get_settings()
        self._tiers = parse_tiers(self._settings)
        self._policy = policy or self._settings.rate_limit_policy
        uri = storage_uri if storage_uri is not None else self._settings.effective_rate_limit_storage_uri
        self.backend = uri.split("://", 1)[0]  # "memory", "redis", "redis+sentinel", ...
        self._memory = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._redis: SlidingWindowCounterRateLimiter | None = None
        if self.backend != "memory":
            options: dict[str, Any] = {"key_prefix": key_prefix, "wrap_exceptions": True}
            if self.backend.startswith("redis"):
                options |= {"socket_timeout": _REDIS_TIMEOUT_S, "socket_connect_timeout": _REDIS_TIMEOUT_S}
            self._redis = SlidingWindowCounterRateLimiter(storage_from_string(uri, **options))
        self._lock = threading.Lock()
        self._redis_down_until = 0.0
        self._redis_retry_s = redis_retry_seconds
        self.fallback_decisions = 0
        self.redis_failures = 0
        self.last_error: str | None = None

    def cost_for(self, route: str, rows: int = 1) -> int:
        """A batch costs by rows, times the route's RATE_LIMIT_ROUTE_WEIGHTS weight."""
        weight = self._settings.rate_limit_route_weights.get(route, 1)
        return max(1, weight * max(rows, 1))

    def hit(self, identity: str, tier: str, *, cost: int = 1) -> RateLimitDecision:
        """Charge ``cost`` to ``identity`` (a key id, never the key) under ``tier``'s limits."""
        items = self._tiers.get(tier) or self._tiers[""]
        for item in items:
            if cost > item.amount:
                return RateLimitDecision(
                    allowed=False,
                    limit=item.amount,
                    remaining=0,
                    reset_at=time.time(),
                    retry_after=None,
                    cost_too_high=True,
                )
        if self._redis is not None and time.monotonic() >= self._redis_down_until:
            try:
                decision = self._decide(self._redis, items, identity, cost)
            except StorageError as exc:
                self._note_redis_failure(exc)
            else:
                self._note_redis_ok()
                return decision
        if self._redis is not None and self._policy == "fail-closed":
            raise DependencyUnavailableError(
                "rate limits cannot be checked: Redis is unreachable and RATE_LIMIT_POLICY=fail-closed"
            )
        decision = self._decide(self._memory, items, identity, cost)
        if self._redis is None:
            return decision
        with self._lock:
            self.fallback_decisions += 1
        return RateLimitDecision(
            allowed=decision.allowed,
            limit=decision.limit,
            remaining=decision.remaining,
            reset_at=decision.reset_at,
            retry_after=decision.retry_after,
            degraded=True,
        )

    @staticmethod
    def _decide(
        limiter: SlidingWindowCounterRateLimiter, items: list[RateLimitItem], identity: str, cost: int
    ) -> RateLimitDecision:
        # Shortest window first and stop at the first refusal: a client hammering a spent
        # per-minute limit must not also drain its hourly allowance with refused requests.
        for item in items:
            if not limiter.hit(item, identity, cost=cost):
                stats = limiter.get_window_stats(item, identity)
                wait = max(1, math.ceil(stats.reset_time - time.time()))
                return RateLimitDecision(
                    allowed=False,
                    limit=item.amount,
                    remaining=max(stats.remaining, 0),
                    reset_at=stats.reset_time,
                    retry_after=wait,
                )
        tightest: tuple[RateLimitItem, Any] | None = None
        for item in items:
            stats = limiter.get_window_stats(item, identity)
            if tightest is None or stats.remaining < tightest[1].remaining:
                tightest = (item, stats)
        assert tightest is not None  # parse_many never returns an empty list
        item, stats = tightest
        return RateLimitDecision(
            allowed=True,
            limit=item.amount,
            remaining=max(stats.remaining, 0),
            reset_at=stats.reset_time,
            retry_after=None,
        )

    def _note_redis_failure(self, exc: Exception) -> None:
        with self._lock:
            was_up = self._redis_down_until == 0.0
            self._redis_down_until = time.monotonic() + self._redis_retry_s
            self.redis_failures += 1
            self.last_error = f"{exc.__class__.__name__}: {exc}"
        if was_up:
            logger.error("Redis rate-limit store unreachable (%s); policy %s", self.last_error, self._policy)

    def _note_redis_ok(self) -> None:
        if self._redis_down_until == 0.0:
            return
        with self._lock:
            self._redis_down_until = 0.0
        logger.warning("Redis rate-limit store reachable again")

    @property
    def degraded(self) -> bool:
        return self._redis is not None and self._redis_down_until != 0.0

    def health(self) -> dict[str, Any]:
        """For ``/health/detailed``: ``degraded`` while Redis is down. Pings Redis, so an
        idle service notices recovery (and an outage) without waiting for traffic."""
        if self._redis is not None:
            if self._redis.storage.check():
                self._note_redis_ok()
            else:
                self._note_redis_failure(ConnectionError("PING failed"))
        return {
            "status": "degraded" if self.degraded else "ok",
            "backend": self.backend,
            "policy": self._policy,
            "redis_failures": self.redis_failures,
            "fallback_decisions": self.fallback_decisions,
            "last_error": self.last_error if self.degraded else None,
        }
