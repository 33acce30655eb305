"""API keys, rate limits and the prediction log over real HTTP, on PostgreSQL and Redis.

Two ``bentoml serve`` processes share one PostgreSQL database and one Redis, as two
replicas would; each reaches Redis (and server A reaches PostgreSQL) through a proxy the
tests can cut. Server A fails open without Redis, server B fails closed. Both serve a
signed model with REQUIRE_MODEL_SIGNATURE=true, so their start is also the signature's
positive case; the refusals (unsigned, tampered, production settings, old schema) run
``bentoml serve`` and expect it to exit with a clear message before any worker starts.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import make_url

from bundle.bentos import BentoSummary, find_bento, serve_argv
from bundle.model_import import sign_imported_model
from core.settings import Settings
from ops.keys import ApiKeyStore
from ops.signing import SIGNATURE_FILE
from ops.tables import PredictionLogRow
from serving.model_store import read_model
from tests.conftest import REDIS_URL, fresh_postgres_database, require_service
from tests.ops.conftest import postgres_database  # noqa: F401 - a fixture, used by name
from tests.ops.proxy import FaultyProxy
from tests.serving.conftest import (
    SERVE_START_TIMEOUT_S,
    TEST_TIERS,
    BuiltHome,
    Server,
    free_port,
    serve_env,
    start_server,
    stop_server,
)
from tests.serving.load import post_many

pytestmark = [pytest.mark.serve, pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

DAY = {"temperature": 28, "humidity": 85, "rainfall": 50}
SIGNING_KEY = "model-signing-key-for-serving-tests-0123456789"
# Long enough that a key verified before a database cut stays cached through it.
KEY_CACHE_S = "120"
AUTH_FAILURES_PER_MINUTE = 20


@dataclass(frozen=True)
class OpsDeployment:
    home: Settings  # a copy of the built home whose models are signed
    bento: BentoSummary
    database_url: str
    keys: ApiKeyStore
    a: Server  # PostgreSQL and Redis through proxies, fails open
    b: Server  # PostgreSQL direct, Redis through its own proxy, fails closed
    pg_proxy: FaultyProxy
    redis_proxy_a: FaultyProxy
    redis_proxy_b: FaultyProxy

    def key(self, tier: str = "load") -> str:
        return self.keys.create_key(f"test-{tier}", tier).raw_key


def copy_home(built_home: BuiltHome, target: Path) -> Settings:
    """The built home's BentoML store (models and Bentos) under a new FLOOD_HOME."""
    shutil.copytree(built_home.settings.bentoml_home, target / "bentoml", symlinks=True)
    return built_home.settings.model_copy(update={"flood_home": target})


def newest_bento(built_home: BuiltHome, home: Settings) -> BentoSummary:
    return find_bento(built_home.bentos[max(built_home.bentos)].tag, settings=home)


def newest_model_dir(built_home: BuiltHome, home: Settings) -> Path:
    tag = built_home.model_tags[max(built_home.model_tags)]
    return read_model(tag, store_dir=home.bentoml_home / "models")[1]


def sign_newest(built_home: BuiltHome, home: Settings) -> None:
    tag = built_home.model_tags[max(built_home.model_tags)]
    sign_imported_model(tag, store_dir=home.bentoml_home / "models", key=SIGNING_KEY.encode())


def with_port(url: str, port: int) -> str:
    """``url`` pointing at 127.0.0.1:``port`` (a proxy), path and credentials kept."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture(scope="module")
def deployment(
    built_home: BuiltHome,
    postgres_database: str,  # noqa: F811 - the fixture imported above
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OpsDeployment]:
    redis = urlsplit(REDIS_URL)
    redis_host, redis_port = redis.hostname or "127.0.0.1", redis.port or 6379
    require_service("Redis", redis_host, redis_port)
    root = tmp_path_factory.mktemp("ops-home")
    home = copy_home(built_home, root)
    sign_newest(built_home, home)
    bento = newest_bento(built_home, home)
    secret = secrets.token_urlsafe(48)
    pg_port = make_url(postgres_database).port or 5432
    pg_proxy = FaultyProxy("127.0.0.1", pg_port)
    redis_proxy_a = FaultyProxy(redis_host, redis_port)
    redis_proxy_b = FaultyProxy(redis_host, redis_port)
    for proxy in (pg_proxy, redis_proxy_a, redis_proxy_b):
        proxy.start()
    common = {
        "SECRET_KEY": secret,
        "REQUIRE_MODEL_SIGNATURE": "true",
        "MODEL_SIGNING_KEY": SIGNING_KEY,
        "API_KEY_CACHE_SECONDS": KEY_CACHE_S,
        "AUTH_FAILURE_LIMIT": f"{AUTH_FAILURES_PER_MINUTE}/minute",
        # The tests play clients behind one proxy by sending X-Forwarded-For; without it
        # the peer (127.0.0.1) counts.
        "TRUSTED_PROXY_HOPS": "1",
    }
    env_a = {
        **common,
        "DATABASE_URL": with_port(postgres_database, pg_proxy.port),
        "REDIS_URL": with_port(REDIS_URL, redis_proxy_a.port),
        "RATE_LIMIT_POLICY": "fail-open",
    }
    env_b = {
        **common,
        "DATABASE_URL": postgres_database,
        "REDIS_URL": with_port(REDIS_URL, redis_proxy_b.port),
        "RATE_LIMIT_POLICY": "fail-closed",
    }
    with ThreadPoolExecutor(2) as pool:
        starting = [
            pool.submit(start_server, bento, settings=home, log=root / f"serve-{name}.log", env=env)
            for name, env in (("a", env_a), ("b", env_b))
        ]
        a, b = (future.result() for future in starting)
    keys = ApiKeyStore(
        settings=Settings(
            flood_home=root,
            database_url=postgres_database,
            secret_key=SecretStr(secret),
            rate_limit_tiers=TEST_TIERS,
        ),
        cache_seconds=0,
    )
    try:
        yield OpsDeployment(
            home, bento, postgres_database, keys, a, b, pg_proxy, redis_proxy_a, redis_proxy_b
        )
    finally:
        for server in (a, b):
            stop_server(server.process)
        for proxy in (pg_proxy, redis_proxy_a, redis_proxy_b):
            proxy.stop()


def post(server: Server, headers: dict[str, str] | None = None, *, json: Any = DAY) -> httpx.Response:
    path = "/api/v1/predict/batch" if isinstance(json, dict) and "observations" in json else "/api/v1/predict"
    return httpx.post(f"{server.url}{path}", json=json, headers=headers or {}, timeout=30)


def metric_total(text_format: str, name: str) -> float:
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    return sum(float(m.group(2)) for m in pattern.finditer(text_format))


def wait_until(condition: Any, *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.2)


# -- API keys ---------------------------------------------------------------------------


def test_requests_without_a_valid_key_are_401_with_a_reason(deployment: OpsDeployment) -> None:
    a = deployment.a
    revoked = deployment.key()
    deployment.keys.revoke_key(revoked[:16])
    expired = deployment.keys.create_key(
        "expired", "load", expires_at=datetime.now(UTC) - timedelta(minutes=1)
    ).raw_key
    guessed = f"fnq_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"
    cases = {
        "missing": {},
        "unknown": {"X-API-Key": guessed},
        "revoked": {"X-API-Key": revoked},
        "expired": {"X-API-Key": expired},
    }
    for reason, headers in cases.items():
        refused = post(a, headers)
        assert refused.status_code == 401, (reason, refused.text)
        assert refused.json()["error"]["code"] == reason
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert post(a, {"X-API-Key": "not-even-a-key"}).json()["error"]["code"] == "unknown"
    assert httpx.get(f"{a.url}/api/v1/model", timeout=10).status_code == 401
    log = a.log.read_text()
    for raw in (revoked, expired, guessed):
        assert raw not in log, "a key was logged"


def test_bearer_and_rotated_keys_are_accepted(deployment: OpsDeployment) -> None:
    a = deployment.a
    key = deployment.key()
    bearer = post(a, {"Authorization": f"Bearer {key}"})
    assert bearer.status_code == 200, bearer.text
    old_id = key[:16]
    successor = deployment.keys.rotate_key(old_id, grace_hours=1).raw_key
    # Within the grace period both work; ended (grace 0), only the successor.
    assert post(a, {"X-API-Key": successor}).status_code == 200
    assert post(a, {"X-API-Key": key}).status_code == 200
    other = deployment.key()
    deployment.keys.rotate_key(other[:16], grace_hours=0)
    ended = post(a, {"X-API-Key": other})
    assert ended.status_code == 401 and ended.json()["error"]["code"] == "expired"


def test_health_and_metrics_need_no_key(deployment: OpsDeployment) -> None:
    for server in (deployment.a, deployment.b):
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for path in ("/health", "/health/detailed", "/health/ready", "/metrics", "/livez", "/readyz"):
                assert client.get(path).status_code == 200, path
            detailed = client.get("/health/detailed").json()
            assert detailed["status"] == "healthy", detailed
            assert detailed["operations"]["rate_limiter"]["backend"] == "redis"


def metric_value(text_format: str, name: str, labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (``reason="unknown"``)."""
    pattern = re.compile(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", re.MULTILINE)
    return sum(float(m.group(2)) for m in pattern.finditer(text_format) if labels in m.group(1))


def guessed_key() -> str:
    return f"fnq_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"


def within_one_minute_window(requests: int) -> None:
    """Wait, if need be, so ``requests`` quick requests fall in one minute of Redis's clock:
    across a boundary the sliding window still counts part of the last minute, and exact
    counts would depend on where the boundary fell."""
    if time.time() % 60 > 60 - max(5.0, requests * 0.1):
        time.sleep(60 - time.time() % 60 + 0.5)


@pytest.mark.security
def test_failed_authentication_is_limited_per_client_address(deployment: OpsDeployment) -> None:
    """Random keys from one address: each used to cost a database lookup, without end (6,073
    in 8 s). Now the address gets AUTH_FAILURE_LIMIT 401s across both workers and replicas'
    shared Redis, then 429 with no lookup. Real keys keep working from it: one already
    verified, and one made after the flood that no worker has seen (another client behind
    the same NAT)."""
    b = deployment.b
    known = {"X-API-Key": deployment.key()}
    # A documentation range, random per run: the counters outlive the test in Redis.
    address = f"198.51.100.{secrets.randbelow(254) + 1}"
    assert post(b, {**known, "X-Forwarded-For": address}).status_code == 200
    guesses = 3 * AUTH_FAILURES_PER_MINUTE
    within_one_minute_window(guesses)
    before = httpx.get(f"{b.url}/metrics", timeout=10).text
    answers = [post(b, {"X-API-Key": guessed_key(), "X-Forwarded-For": address}) for _ in range(guesses)]
    after = httpx.get(f"{b.url}/metrics", timeout=10).text
    codes = [answer.status_code for answer in answers]
    lookups = metric_value(after, "flood_auth_refusals_total", 'reason="unknown"') - metric_value(
        before, "flood_auth_refusals_total", 'reason="unknown"'
    )
    throttled = metric_total(after, "flood_auth_throttled_total") - metric_total(
        before, "flood_auth_throttled_total"
    )
    print(
        f"\n[auth flood] {guesses} random keys from one address: {codes.count(401)} x 401, "
        f"{codes.count(429)} x 429, {lookups:.0f} refused after a lookup, {throttled:.0f} throttled"
    )
    assert codes.count(401) == AUTH_FAILURES_PER_MINUTE, codes
    assert codes.count(429) == guesses - AUTH_FAILURES_PER_MINUTE, codes
    refused = next(answer for answer in answers if answer.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert "failed authentications" in refused.json()["error"]["message"]
    # Each worker looks a key up once more before it learns the address is over its limit.
    assert AUTH_FAILURES_PER_MINUTE <= lookups <= AUTH_FAILURES_PER_MINUTE + 2, lookups
    assert throttled == guesses - AUTH_FAILURES_PER_MINUTE
    # New connections each: both API workers answer some of them.
    assert [post(b, {**known, "X-Forwarded-For": address}).status_code for _ in range(8)] == [200] * 8

    # A key no worker has seen: its id is in the active-key list a worker re-reads at most
    # every 5 s, so within that it is answered, and from then on on every worker.
    fresh = deployment.key()
    deadline = time.monotonic() + 12
    statuses = [post(b, {"X-API-Key": fresh, "X-Forwarded-For": address}).status_code]
    while statuses[-1] != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
        statuses.append(post(b, {"X-API-Key": fresh, "X-Forwarded-For": address}).status_code)
    assert statuses[-1] == 200 and set(statuses) <= {200, 429}, statuses
    # A real id with a guessed secret: at most one lookup per (address, id) and worker (the
    # fresh key's own may have used it), then refused unchecked.
    forged = f"{fresh.rsplit('_', 1)[0]}_{secrets.token_urlsafe(32)}"
    forged_codes = [post(b, {"X-API-Key": forged, "X-Forwarded-For": address}).status_code for _ in range(8)]
    print(f"[auth flood] a new key from the address: {statuses}; its id, a guessed secret: {forged_codes}")
    assert forged_codes.count(401) <= 2 and forged_codes.count(429) == 8 - forged_codes.count(401)

    # One trusted hop: the proxy appended the last entry, so entries before it are the
    # client's own words. Prepending an address neither escapes the limit nor moves it.
    spoofed = post(b, {"X-API-Key": guessed_key(), "X-Forwarded-For": f"203.0.113.10, {address}"})
    assert spoofed.status_code == 429, spoofed.text
    blamed = post(b, {"X-API-Key": guessed_key(), "X-Forwarded-For": f"{address}, 203.0.113.9"})
    assert blamed.status_code == 401, blamed.text


# -- rate limits ------------------------------------------------------------------------


def test_rate_limit_headers_429_and_retry_after(deployment: OpsDeployment) -> None:
    headers = {"X-API-Key": deployment.key("tiny")}  # 3/minute
    answers = [post(deployment.a, headers) for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert [r.headers["X-RateLimit-Remaining"] for r in answers] == ["2", "1", "0", "0"]
    assert all(r.headers["X-RateLimit-Limit"] == "3" for r in answers)
    now = time.time()
    assert all(now - 1 <= int(r.headers["X-RateLimit-Reset"]) <= now + 61 for r in answers)
    refused = answers[-1]
    assert refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60


def test_a_batch_costs_its_rows(deployment: OpsDeployment) -> None:
    headers = {"X-API-Key": deployment.key("rows")}  # 10/minute
    four = post(deployment.a, headers, json={"observations": [DAY] * 4})
    assert four.status_code == 200 and four.headers["X-RateLimit-Remaining"] == "6"
    seven = post(deployment.a, headers, json={"observations": [DAY] * 7})
    assert seven.status_code == 429
    # More rows than the whole limit: waiting cannot help, so not 429.
    eleven = post(deployment.a, headers, json={"observations": [DAY] * 11})
    assert eleven.status_code == 413 and eleven.json()["error"]["code"] == "cost_exceeds_limit"
    assert "Retry-After" not in eleven.headers
    single = post(deployment.a, headers)
    assert single.status_code == 200 and single.headers["X-RateLimit-Remaining"] == "5"


def test_two_processes_share_one_limit(deployment: OpsDeployment) -> None:
    headers = {"X-API-Key": deployment.key("shared")}  # 10/minute

    async def burst() -> list[tuple[int, str]]:
        async with httpx.AsyncClient(timeout=30, headers=headers) as client:
            calls = [
                client.post(f"{server.url}/api/v1/predict", json=DAY)
                for _ in range(15)
                for server in (deployment.a, deployment.b)
            ]
            answers = await asyncio.gather(*calls)
            return [(r.status_code, r.json().get("error", {}).get("code", "")) for r in answers]

    outcomes = asyncio.run(burst())
    statuses = [status for status, _ in outcomes]
    assert statuses.count(200) == 10, Counter(outcomes)
    assert statuses.count(429) == 20, Counter(outcomes)


def test_fail_open_serves_without_redis_and_reports_degraded(deployment: OpsDeployment) -> None:
    a = deployment.a
    headers = {"X-API-Key": deployment.key()}
    assert post(a, headers).status_code == 200  # the key is cached before Redis goes
    before = httpx.get(f"{a.url}/metrics", timeout=10).text
    deployment.redis_proxy_a.stop()
    try:
        answers = [post(a, headers) for _ in range(5)]
        assert [r.status_code for r in answers] == [200] * 5
        assert all("X-RateLimit-Remaining" in r.headers for r in answers)
        detailed = httpx.get(f"{a.url}/health/detailed", timeout=10).json()
        assert detailed["status"] == "degraded"
        assert detailed["operations"]["rate_limiter"]["status"] == "degraded"
        assert detailed["checks"]["redis"]["status"] == "unhealthy"
        # Failing open, the replica stays in rotation.
        assert httpx.get(f"{a.url}/health/ready", timeout=10).status_code == 200
        after = httpx.get(f"{a.url}/metrics", timeout=10).text
        for name in ("flood_ratelimit_fallback_decisions_total", "flood_ratelimit_redis_failures_total"):
            assert metric_total(after, name) > metric_total(before, name), name
    finally:
        deployment.redis_proxy_a.start()
    wait_until(
        lambda: httpx.get(f"{a.url}/health/detailed", timeout=10).json()["status"] == "healthy",
        timeout_s=15,
        what="server A healthy again once Redis is back",
    )


@pytest.mark.security
def test_public_health_names_no_hosts_or_errors_and_admin_keys_see_them(deployment: OpsDeployment) -> None:
    a = deployment.a
    admin = {"X-API-Key": deployment.key("admin")}
    plain = {"X-API-Key": deployment.key()}
    deployment.redis_proxy_a.stop()
    try:
        for path in ("/health/detailed", "/health/ready"):
            for headers in ({}, plain):
                public = httpx.get(f"{a.url}{path}", headers=headers, timeout=10)
                text = public.text
                assert "127.0.0.1" not in text and str(deployment.redis_proxy_a.port) not in text, text
                assert "Error" not in text and "detail" not in text, text
                redis = public.json()["checks"]["redis"]
                assert redis["status"] == "unhealthy" and redis["latency_ms"] >= 0, redis
            full = httpx.get(f"{a.url}{path}", headers=admin, timeout=10).json()
            assert str(deployment.redis_proxy_a.port) in full["checks"]["redis"]["detail"], full
        full = httpx.get(f"{a.url}/health/detailed", headers=admin, timeout=10).json()
        assert full["operations"]["rate_limiter"]["last_error"], full
        bad = httpx.get(f"{a.url}/health/detailed", headers={"X-API-Key": guessed_key()}, timeout=10)
        assert bad.status_code == 401, bad.text
    finally:
        deployment.redis_proxy_a.start()
    wait_until(
        lambda: httpx.get(f"{a.url}/health/detailed", timeout=10).json()["status"] == "healthy",
        timeout_s=15,
        what="server A healthy again once Redis is back",
    )


def test_fail_closed_refuses_without_redis(deployment: OpsDeployment) -> None:
    b = deployment.b
    headers = {"X-API-Key": deployment.key()}
    assert post(b, headers).status_code == 200
    deployment.redis_proxy_b.stop()
    try:
        refused = post(b, headers)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "unavailable" and "Retry-After" in refused.headers
        assert httpx.get(f"{b.url}/health/ready", timeout=10).status_code == 503
    finally:
        deployment.redis_proxy_b.start()
    wait_until(lambda: post(b, headers).status_code == 200, timeout_s=15, what="server B serving again")


# -- prediction log ---------------------------------------------------------------------


def logged_rows(database_url: str, client_ids: list[str]) -> dict[str, list[PredictionLogRow]]:
    """Prediction-log rows by the X-Request-ID their requests were sent with."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(PredictionLogRow).where(PredictionLogRow.client_request_id.in_(client_ids))
            ).all()
    finally:
        engine.dispose()
    found: dict[str, list[Any]] = {}
    for row in rows:
        found.setdefault(row.client_request_id, []).append(row)
    return found


def test_predictions_land_in_postgres_once_through_a_database_outage(deployment: OpsDeployment) -> None:
    a = deployment.a
    key = deployment.key()
    headers = {"X-API-Key": key}
    run = uuid.uuid4().hex[:8]
    sent: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}  # request id -> (inputs, answer)

    def send(i: int) -> None:
        request_id, inputs = f"{run}-{i}", {**DAY, "rainfall": i}
        answer = post(a, {**headers, "X-Request-ID": request_id}, json=inputs)
        assert answer.status_code == 200, answer.text
        sent[request_id] = (inputs, answer.json())

    for i in range(10):
        send(i)
    deployment.pg_proxy.stop()
    try:
        for i in range(10, 30):
            send(i)  # the key is cached, the rows go to the journal
        wait_until(
            lambda: httpx.get(f"{a.url}/health/detailed", timeout=10).json()["operations"]["prediction_log"][
                "journal_pending"
            ],
            timeout_s=10,
            what="rows journaled while PostgreSQL is unreachable",
        )
        detailed = httpx.get(f"{a.url}/health/detailed", timeout=10).json()
        assert detailed["status"] == "degraded" and detailed["checks"]["database"]["status"] == "unhealthy"
        # Degraded, not unready: predictions keep succeeding, so the replica stays in rotation.
        assert httpx.get(f"{a.url}/health/ready", timeout=10).status_code == 200
    finally:
        deployment.pg_proxy.start()
    batch_id = f"{run}-batch"
    batch = post(a, {**headers, "X-Request-ID": batch_id}, json={"observations": [DAY, DAY]})
    assert batch.status_code == 200
    expected = [*sent, batch_id]
    wait_until(
        lambda: len(logged_rows(deployment.database_url, expected)) == len(expected),
        timeout_s=30,
        what="every prediction in PostgreSQL after the outage",
    )
    found = logged_rows(deployment.database_url, expected)
    assert sorted(r.request_id for r in found.pop(batch_id)) == [
        f"{batch.json()['request_id']}#{i}" for i in range(2)
    ]
    assert all(len(rows) == 1 for rows in found.values()), "a request was logged twice"
    served = httpx.get(f"{a.url}/api/v1/model", headers=headers, timeout=10).json()
    for request_id, (inputs, answer) in sent.items():
        (row,) = found[request_id]
        assert row.key_id == key[:16] and row.inputs == inputs
        assert row.probability == answer["probability"] and row.risk_level == answer["risk_level"]
        assert row.model_version == str(served["version"]) and row.bento_tag == served["bento_tag"]
        assert row.latency_ms > 0


def test_sigterm_flushes_every_prediction_to_postgres(deployment: OpsDeployment) -> None:
    """Last in the module: it stops server B."""
    b = deployment.b
    run = uuid.uuid4().hex[:8]
    headers = {"X-API-Key": deployment.key()}
    report = asyncio.run(
        post_many(f"{b.url}/api/v1/predict", DAY, requests=200, concurrency=8, headers=headers)
    )
    assert report.errors == 0, report.statuses
    ids = [f"{run}-{i}" for i in range(20)]
    for request_id in ids:
        assert post(b, {**headers, "X-Request-ID": request_id}).status_code == 200
    # Stopped right after answering: the last rows are still queued in the worker.
    assert stop_server(b.process) == 0
    found = logged_rows(deployment.database_url, ids)
    assert sorted(found) == sorted(ids)
    engine = create_engine(deployment.database_url)
    with engine.connect() as connection:
        duplicates = connection.execute(
            select(PredictionLogRow.request_id).group_by(PredictionLogRow.request_id).having(func.count() > 1)
        ).all()
    engine.dispose()
    assert duplicates == []


# -- refusals at start ------------------------------------------------------------------


def expect_refusal(bento: BentoSummary, home: Settings, env: dict[str, str]) -> str:
    """Run ``bentoml serve``; it must exit non-zero before serving. Its stderr."""
    port = free_port()
    process = subprocess.Popen(
        serve_argv(bento, host="127.0.0.1", port=port),
        env=serve_env(home, env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=SERVE_START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop_server(process)  # type: ignore[arg-type]
        raise AssertionError("the server started instead of refusing") from None
    assert process.returncode != 0, stderr
    assert "not started" in stderr, stderr
    return stderr


@pytest.fixture(scope="module")
def refusal_home(built_home: BuiltHome, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return copy_home(built_home, tmp_path_factory.mktemp("refusal-home"))


def test_an_unsigned_model_is_refused(built_home: BuiltHome, refusal_home: Settings) -> None:
    assert not (newest_model_dir(built_home, refusal_home) / SIGNATURE_FILE).exists()
    env = {"REQUIRE_MODEL_SIGNATURE": "true", "MODEL_SIGNING_KEY": SIGNING_KEY}
    stderr = expect_refusal(newest_bento(built_home, refusal_home), refusal_home, env)
    assert "is not signed" in stderr


def test_a_tampered_model_or_wrong_key_is_refused(built_home: BuiltHome, refusal_home: Settings) -> None:
    sign_newest(built_home, refusal_home)
    bento = newest_bento(built_home, refusal_home)
    wrong_key = {"REQUIRE_MODEL_SIGNATURE": "true", "MODEL_SIGNING_KEY": "another-key-" + "x" * 32}
    assert "signature check failed" in expect_refusal(bento, refusal_home, wrong_key)
    model_dir = newest_model_dir(built_home, refusal_home)
    (model_dir / "model.onnx").write_bytes((model_dir / "model.onnx").read_bytes() + b"\0")
    env = {"REQUIRE_MODEL_SIGNATURE": "true", "MODEL_SIGNING_KEY": SIGNING_KEY}
    stderr = expect_refusal(bento, refusal_home, env)
    assert "signature check failed" in stderr and "model.onnx" in stderr


def test_production_refuses_unsafe_settings(built_home: BuiltHome) -> None:
    bento = built_home.bentos[max(built_home.bentos)]
    stderr = expect_refusal(bento, built_home.settings, {"FLOOD_ENV": "production"})
    for variable in ("DATABASE_URL", "SECRET_KEY", "synthetic data"):
        assert variable in stderr


def test_a_database_behind_the_schema_is_refused(built_home: BuiltHome) -> None:
    with fresh_postgres_database("flood_empty") as empty:
        bento = built_home.bentos[max(built_home.bentos)]
        stderr = expect_refusal(bento, built_home.settings, {"DATABASE_URL": empty})
        assert "flood db upgrade" in stderr
