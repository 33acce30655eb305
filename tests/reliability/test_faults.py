"""Faults under load against a served Bento with PostgreSQL and Redis of its own.

One server (fail-open rate limits) uses a private PostgreSQL cluster and a private Redis,
so both can be killed or stopped without touching the shared servers. The tests run in
file order; the last sends SIGTERM and ends the server. Each records a figure for the
fault table (see conftest).
"""

from __future__ import annotations

import secrets
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import psutil
import pytest
from pydantic import SecretStr
from sqlalchemy import create_engine, func, select

from bundle.bentos import find_bento
from core.errors import BackupError
from core.settings import Settings
from ops.backup import restore_backup, run_backup, verify_backup
from ops.database import dispose_engines
from ops.keys import ApiKeyStore
from ops.tables import PredictionLogRow
from tests.reliability.conftest import Figure, record_figure
from tests.reliability.load import DAY, BackgroundLoad, Outcome, answered_ids, log_counts, statuses
from tests.reliability.services import PrivatePostgres, PrivateRedis
from tests.serving.conftest import TEST_TIERS, BuiltHome, Server, start_server, stop_server

pytestmark = [pytest.mark.faults, pytest.mark.serve, pytest.mark.slow]

MODEL_SERVICE = "flood_risk_model"
PG_OUTAGE_S = 30


@dataclass(frozen=True)
class Deployment:
    server: Server
    home: Settings  # FLOOD_HOME, DATABASE_URL and SECRET_KEY of the server
    postgres: PrivatePostgres
    redis: PrivateRedis
    keys: ApiKeyStore

    def key(self, tier: str = "load") -> str:
        return self.keys.create_key(f"faults-{tier}", tier).raw_key

    def post(self, key: str, **headers: str) -> httpx.Response:
        return httpx.post(
            f"{self.server.url}/api/v1/predict", json=DAY, headers={"X-API-Key": key, **headers}, timeout=35
        )

    def detailed(self) -> dict[str, object]:
        return dict(httpx.get(f"{self.server.url}/health/detailed", timeout=10).json())


@pytest.fixture(scope="module")
def deployment(built_home: BuiltHome, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    postgres = PrivatePostgres()
    redis = PrivateRedis()
    root = tmp_path_factory.mktemp("faults-home")
    try:
        postgres.init()
        postgres.start()
        database_url = postgres.create_database("flood")
        redis.start()
        shutil.copytree(built_home.settings.bentoml_home, root / "bentoml", symlinks=True)
        secret = secrets.token_urlsafe(48)
        home = Settings(
            flood_home=root,
            database_url=database_url,
            secret_key=SecretStr(secret),
            rate_limit_tiers=TEST_TIERS,
        )
        bento = find_bento(built_home.bentos[max(built_home.bentos)].tag, settings=home)
        env = {
            "SECRET_KEY": secret,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis.url,
            "RATE_LIMIT_POLICY": "fail-open",
            # One API worker: the tests read the limiter's and the prediction log's state
            # from /health/detailed, which reports whichever worker answers.
            "SERVING_API_WORKERS": "1",
        }
        server = start_server(bento, settings=home, log=root / "serve.log", env=env)
        yield Deployment(server, home, postgres, redis, ApiKeyStore(settings=home, cache_seconds=0))
        # SIGTERM to the arbiter: its workers run in process groups of their own, so only
        # the arbiter can stop them all.
        stop_server(server.process)
    finally:
        dispose_engines()
        redis.stop()
        postgres.destroy()


def wait_until(condition: Callable[[], bool], *, timeout_s: float, what: str) -> float:
    """Seconds until ``condition()`` held."""
    start = time.monotonic()
    while True:
        try:
            if condition():
                return time.monotonic() - start
        except (httpx.HTTPError, OSError):
            pass
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.1)


def rows_lost(
    database_url: str, outcomes: list[Outcome], *, timeout_s: float, rows_per_request: int = 1
) -> tuple[int, float]:
    """Rows of answered predictions missing from the log once it settles, and how long
    settling took. No request may have more rows than it predicted (a duplicate)."""
    ids = answered_ids(outcomes)
    expected = len(ids) * rows_per_request

    def logged() -> int:
        counts = log_counts(database_url, ids)
        assert all(n <= rows_per_request for n in counts.values()), "a prediction was logged more than once"
        return sum(counts.values())

    try:
        waited = wait_until(
            lambda: logged() == expected, timeout_s=timeout_s, what="every answered row in the log"
        )
    except AssertionError:
        waited = timeout_s
    return expected - logged(), waited


def model_workers(server: Server) -> list[psutil.Process]:
    workers = []
    for child in psutil.Process(server.process.pid).children():
        try:
            argv = child.cmdline()
        except psutil.Error:
            continue
        if MODEL_SERVICE in argv and argv[argv.index(MODEL_SERVICE) - 1] == "--service-name":
            workers.append(child)
    return workers


def test_redis_killed_during_load_serves_on_and_limits_resume(deployment: Deployment) -> None:
    d = deployment
    tiny = d.key("tiny")  # 3/minute
    assert [d.post(tiny).status_code for _ in range(4)] == [200, 200, 200, 429]
    load = BackgroundLoad(d.server.url, {"X-API-Key": d.key()}).start()
    time.sleep(3)
    d.redis.kill()
    time.sleep(10)
    limiter = d.detailed()["operations"]["rate_limiter"]  # type: ignore[index]
    assert limiter["status"] == "degraded" and limiter["policy"] == "fail-open", limiter
    assert httpx.get(f"{d.server.url}/health/ready", timeout=10).status_code == 200
    d.redis.start()
    recovery = wait_until(
        lambda: d.detailed()["operations"]["rate_limiter"]["status"] == "ok",  # type: ignore[index]
        timeout_s=30,
        what="the rate limiter back on Redis",
    )
    time.sleep(2)
    outcomes = load.stop()
    # Limits resume in Redis: a fresh key is refused after its 3, and Redis holds its window.
    fresh = d.key("tiny")
    assert [d.post(fresh).status_code for _ in range(4)] == [200, 200, 200, 429]
    assert d.redis.keys(f"*{fresh[:16]}*"), "the limit was not kept in Redis"
    lost, _ = rows_lost(d.home.effective_database_url, outcomes, timeout_s=30)
    errors = sum(n for status, n in statuses(outcomes).items() if status != 200)
    record_figure(
        Figure(
            "Redis kill -9 for 10 s (fail-open)",
            len(outcomes),
            errors,
            lost,
            recovery,
            "limits in Redis again",
        )
    )
    assert errors == 0, statuses(outcomes)
    assert lost == 0


def test_postgres_stopped_during_load_logs_every_request_once(deployment: Deployment) -> None:
    d = deployment
    load = BackgroundLoad(d.server.url, {"X-API-Key": d.key()}).start()
    time.sleep(3)
    d.postgres.stop()
    time.sleep(PG_OUTAGE_S / 2)
    detailed = d.detailed()
    assert detailed["checks"]["database"]["status"] == "unhealthy", detailed  # type: ignore[index]
    assert detailed["operations"]["prediction_log"]["journal_pending"], detailed  # type: ignore[index]
    assert httpx.get(f"{d.server.url}/health/ready", timeout=10).status_code == 200
    time.sleep(PG_OUTAGE_S / 2)
    d.postgres.start()
    started = time.monotonic()
    time.sleep(3)
    outcomes = load.stop()
    lost, _ = rows_lost(d.home.effective_database_url, outcomes, timeout_s=60)
    recovery = time.monotonic() - started  # until every answered prediction was in the log
    errors = sum(n for status, n in statuses(outcomes).items() if status != 200)
    record_figure(
        Figure(
            f"PostgreSQL stopped {PG_OUTAGE_S} s", len(outcomes), errors, lost, recovery, "journal replayed"
        )
    )
    assert errors == 0, statuses(outcomes)
    assert lost == 0


def test_a_truncated_backup_fails_verify_and_restore_refuses_it(deployment: Deployment) -> None:
    """Of the database the load above filled (tests/ops/test_backup.py covers SQLite)."""
    d = deployment
    url = d.home.effective_database_url
    manifest = run_backup(settings=d.home)
    backup = d.home.backup_dir / manifest.file
    verify_backup(backup, settings=d.home)
    rows = manifest.tables["prediction_log"]
    backup.write_bytes(backup.read_bytes()[: manifest.size_bytes // 2])
    with pytest.raises(BackupError, match="truncated"):
        verify_backup(backup, settings=d.home)
    with pytest.raises(BackupError, match="truncated"):
        restore_backup(backup, settings=d.home)
    engine = create_engine(url)
    with engine.connect() as connection:
        now = connection.execute(select(func.count()).select_from(PredictionLogRow)).scalar_one()
    engine.dispose()
    assert now >= rows > 0
    record_figure(
        Figure("backup file truncated", 0, 0, 0, None, f"verify fails, restore refused, {rows} rows kept")
    )


def test_model_worker_killed_readiness_503_then_recovers_alone(deployment: Deployment) -> None:
    d = deployment
    (worker,) = model_workers(d.server)
    load = BackgroundLoad(d.server.url, {"X-API-Key": d.key()}, concurrency=2, pause_s=0.05).start()
    time.sleep(2)
    worker.kill()
    killed = time.monotonic()
    readiness: list[int] = []

    def ready_again() -> bool:
        readiness.append(httpx.get(f"{d.server.url}/health/ready", timeout=10).status_code)
        return readiness[-1] == 200 and 503 in readiness

    try:
        recovery = wait_until(ready_again, timeout_s=60, what="readiness 503 then 200 again")
    except AssertionError:
        recovery = time.monotonic() - killed if readiness and readiness[-1] == 200 else -1.0
    time.sleep(2)
    outcomes = load.stop()
    (restarted,) = model_workers(d.server)
    assert restarted.pid != worker.pid
    counted = statuses(outcomes)
    lost, _ = rows_lost(d.home.effective_database_url, outcomes, timeout_s=30)
    errors = sum(n for status, n in counted.items() if status != 200)
    slowest = max(o.latency_s for o in outcomes)
    record_figure(
        Figure(
            "model worker kill -9",
            len(outcomes),
            errors,
            lost,
            recovery,
            f"readiness seen {sorted(set(readiness))}, slowest request {slowest:.1f} s",
        )
    )
    assert set(counted) <= {200, 503}, counted  # answered, never hung or dropped
    assert slowest < 30
    assert recovery > 0, f"readiness never went 503 then 200: {readiness}"
    assert d.post(d.key()).status_code == 200
    assert lost == 0


def test_sigterm_during_load_completes_in_flight_and_flushes_the_log(deployment: Deployment) -> None:
    """Last: the server stops. SIGTERM goes to the arbiter only, as an orchestrator sends it."""
    d = deployment
    load = BackgroundLoad(d.server.url, {"X-API-Key": d.key()}, concurrency=8, pause_s=0.0).start()
    time.sleep(3)
    signalled = time.monotonic()
    d.server.process.send_signal(signal.SIGTERM)
    code = d.server.process.wait(timeout=90)
    stopped_s = time.monotonic() - signalled
    outcomes = load.stop()
    in_flight = [o for o in outcomes if o.started < signalled]
    after = [o for o in outcomes if o.started >= signalled]
    failed = [o for o in in_flight if o.status != 200]
    lost, _ = rows_lost(d.home.effective_database_url, outcomes, timeout_s=5)
    record_figure(
        Figure(
            "SIGTERM under load (concurrency 8)",
            len(in_flight),
            len(failed),
            lost,
            None,
            f"exit {code} after {stopped_s:.1f} s; {len(after)} requests sent after the signal refused",
        )
    )
    assert code == 0
    assert failed == [], failed[:5]
    assert lost == 0
