"""Rate limits: tiers on real Redis, shared by processes, headers, and Redis outages."""

from __future__ import annotations

import json
import multiprocessing
import time

import pytest

from core.errors import ConfigurationError, DependencyUnavailableError
from core.settings import get_settings
from ops.ratelimit import RateLimiter
from tests.conftest import REDIS_URL
from tests.ops.proxy import FaultyProxy

CLOSED_PORT_URL = "redis://127.0.0.1:1/0"


@pytest.fixture
def tiers(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    tiers = {"free": "5/minute;100/hour", "basic": "20/minute", "tiny": "3/minute;4/hour"}
    monkeypatch.setenv("RATE_LIMIT_TIERS", json.dumps(tiers))
    get_settings.cache_clear()
    return tiers


def allowed_count(limiter: RateLimiter, identity: str, tier: str, attempts: int) -> int:
    return sum(limiter.hit(identity, tier).allowed for _ in range(attempts))


def test_default_tiers_match_the_issue() -> None:
    tiers = get_settings().rate_limit_tiers
    assert tiers == {
        "free": "5/minute;100/hour",
        "basic": "20/minute",
        "pro": "100/minute",
        "enterprise": "500/minute",
    }


@pytest.mark.redis
@pytest.mark.parametrize(("tier", "limit"), [("free", 5), ("basic", 20)])
def test_each_tier_allows_exactly_its_limit(
    tiers: dict[str, str], redis_url: str, redis_prefix: str, tier: str, limit: int
) -> None:
    limiter = RateLimiter(storage_uri=redis_url, key_prefix=redis_prefix)
    assert allowed_count(limiter, "key-a", tier, limit + 3) == limit
    # Limits are per key: another key of the same tier starts fresh.
    assert limiter.hit("key-b", tier).allowed


@pytest.mark.redis
def test_headers_and_retry_after(tiers: dict[str, str], redis_url: str, redis_prefix: str) -> None:
    limiter = RateLimiter(storage_uri=redis_url, key_prefix=redis_prefix)
    first = limiter.hit("k", "free")
    assert first.allowed and not first.degraded
    headers = first.headers()
    assert headers["X-RateLimit-Limit"] == "5"
    assert headers["X-RateLimit-Remaining"] == "4"
    assert 0 < int(headers["X-RateLimit-Reset"]) - time.time() <= 61
    assert "Retry-After" not in headers
    for _ in range(4):
        limiter.hit("k", "free")
    denied = limiter.hit("k", "free")
    assert not denied.allowed and denied.remaining == 0
    assert denied.retry_after is not None and 1 <= denied.retry_after <= 60
    assert denied.headers()["Retry-After"] == str(denied.retry_after)


@pytest.mark.redis
def test_multiple_windows_and_refusals_do_not_drain_the_longer_one(
    tiers: dict[str, str], redis_url: str, redis_prefix: str
) -> None:
    limiter = RateLimiter(storage_uri=redis_url, key_prefix=redis_prefix)
    assert allowed_count(limiter, "k", "tiny", 10) == 3  # 3/minute binds first
    import redis

    client = redis.Redis.from_url(redis_url)
    hour_keys = [k for k in client.scan_iter(match=f"{redis_prefix}:*") if b"/1/hour" in k]
    # the sliding-window counter keeps one integer per window: the 7 refusals cost nothing hourly
    counts = [int(str(client.get(k), "ascii")) for k in hour_keys]  # type: ignore[arg-type]
    assert sum(counts) == 3
    client.close()


@pytest.mark.redis
def test_batch_costs_by_rows(
    tiers: dict[str, str], redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RATE_LIMIT_ROUTE_WEIGHTS", json.dumps({"predict_batch": 2}))
    get_settings.cache_clear()
    limiter = RateLimiter(storage_uri=redis_url, key_prefix=redis_prefix)
    assert limiter.cost_for("predict", 1) == 1
    assert limiter.cost_for("predict_batch", 4) == 8
    assert limiter.hit("k", "basic", cost=limiter.cost_for("predict_batch", 8)).remaining == 4
    assert not limiter.hit("k", "basic", cost=5).allowed
    assert limiter.hit("k", "basic", cost=4).allowed
    too_big = limiter.hit("k2", "basic", cost=21)
    assert too_big.cost_too_high and too_big.retry_after is None


def _hit_many(prefix: str, attempts: int, start_at: float) -> int:
    limiter = RateLimiter(storage_uri=REDIS_URL, key_prefix=prefix)
    time.sleep(max(0.0, start_at - time.time()))
    return allowed_count(limiter, "shared-key", "basic", attempts)


@pytest.mark.redis
def test_two_processes_share_one_limit(tiers: dict[str, str], redis_url: str, redis_prefix: str) -> None:
    context = multiprocessing.get_context("spawn")
    start_at = time.time() + 3  # both processes importing, then hitting together
    with context.Pool(2) as pool:
        counts = pool.starmap(_hit_many, [(redis_prefix, 15, start_at)] * 2)
    assert sum(counts) == 20
    assert all(count > 0 for count in counts)


@pytest.mark.redis
def test_unreachable_redis_fail_open_uses_the_in_process_limiter(tiers: dict[str, str]) -> None:
    limiter = RateLimiter(storage_uri=CLOSED_PORT_URL, policy="fail-open")
    decisions = [limiter.hit("k", "free") for _ in range(7)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 2
    assert all(d.degraded for d in decisions)
    health = limiter.health()
    assert health["status"] == "degraded" and health["fallback_decisions"] == 7
    assert health["last_error"]


@pytest.mark.redis
def test_unreachable_redis_fail_closed_refuses(tiers: dict[str, str]) -> None:
    limiter = RateLimiter(storage_uri=CLOSED_PORT_URL, policy="fail-closed")
    with pytest.raises(DependencyUnavailableError, match="fail-closed"):
        limiter.hit("k", "free")


@pytest.mark.redis
def test_redis_going_down_and_coming_back(tiers: dict[str, str], redis_url: str, redis_prefix: str) -> None:
    proxy = FaultyProxy("127.0.0.1", 6379)
    proxy.start()
    try:
        limiter = RateLimiter(
            storage_uri=proxy.url_for(redis_url, 6379),
            key_prefix=redis_prefix,
            redis_retry_seconds=0.2,
        )
        assert not limiter.hit("k", "basic").degraded
        proxy.stop()
        during = limiter.hit("k", "basic")
        assert during.allowed and during.degraded
        assert limiter.health()["status"] == "degraded"
        proxy.start()
        time.sleep(0.3)
        after = limiter.hit("k", "basic")
        assert after.allowed and not after.degraded
        assert after.remaining == 18  # Redis kept its count; the outage hit went in-process
        assert limiter.health()["status"] == "ok"
    finally:
        proxy.stop()


def test_without_redis_url_the_limiter_is_in_process(tiers: dict[str, str]) -> None:
    limiter = RateLimiter()
    assert limiter.backend == "memory"
    assert allowed_count(limiter, "k", "free", 8) == 5
    assert limiter.health()["status"] == "ok"


def test_bad_tier_notation_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATE_LIMIT_TIERS", json.dumps({"free": "lots"}))
    get_settings.cache_clear()
    with pytest.raises(ConfigurationError, match="RATE_LIMIT_TIERS"):
        RateLimiter()


def test_the_store_is_a_storage_uri_setting(
    tiers: dict[str, str], monkeypatch: pytest.MonkeyPatch, redis_url: str, redis_prefix: str
) -> None:
    """RATE_LIMIT_STORAGE_URI picks the store by URI, over REDIS_URL; memory:// is in-process."""
    monkeypatch.setenv("REDIS_URL", CLOSED_PORT_URL)
    monkeypatch.setenv("RATE_LIMIT_STORAGE_URI", redis_url)
    get_settings.cache_clear()
    shared = RateLimiter(key_prefix=redis_prefix)
    assert shared.backend == "redis" and not shared.hit("k", "basic").degraded
    monkeypatch.setenv("RATE_LIMIT_STORAGE_URI", "memory://")
    get_settings.cache_clear()
    local = RateLimiter()
    assert local.backend == "memory" and allowed_count(local, "k", "free", 8) == 5
