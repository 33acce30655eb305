"""Shared fixtures: every test gets its own FLOOD_HOME and fresh settings."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# MLflow decides on telemetry at first import, which test collection triggers.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from core.settings import Settings, get_settings

IN_CI = os.environ.get("CI") == "true"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
POSTGRES_URL = os.environ.get("FLOOD_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("FLOOD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def run_flood(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """The `flood` console entry point in-process: what a user gets (domain errors as
    `error: ...` and exit 1), minus the interpreter start. Its exit code."""
    from cli.main import run

    monkeypatch.setattr(sys, "argv", ["flood", *args])
    try:
        run()
    except SystemExit as stopped:
        return int(stopped.code or 0)
    return 0


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """In CI a missing service is a failure; locally the test skips and says why."""
    if port_open(host, port):
        return
    message = f"{name} is not reachable at {host}:{port}"
    if IN_CI:
        pytest.fail(message + " (CI must start it in .ci/run)")
    pytest.skip(message)


@contextlib.contextmanager
def fresh_postgres_database(prefix: str) -> Iterator[str]:
    """URL of a new, empty database on the test server, dropped afterwards."""
    from sqlalchemy.engine import make_url

    from ops.database import scratch_postgres_database

    url = make_url(POSTGRES_URL)
    require_service("PostgreSQL", url.host or "127.0.0.1", url.port or 5432)
    with scratch_postgres_database(POSTGRES_URL, prefix=prefix) as database_url:
        yield database_url


@pytest.fixture(autouse=True)
def flood_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "flood-home"
    monkeypatch.setenv("FLOOD_HOME", str(home))
    # MLFLOW_REGISTRY_URI too: Settings does not read it, but MLflow does, in this process and
    # in every subprocess a test starts (a stale one sent `mlflow models serve` to another store).
    for var in (
        "FLOOD_ENV",
        "DATABASE_URL",
        "REDIS_URL",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_REGISTRY_URI",
        "SECRET_KEY",
    ):
        monkeypatch.delenv(var, raising=False)
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()


@pytest.fixture
def settings(flood_home: Path) -> Settings:
    return get_settings()


@pytest.fixture
def real_data_dir() -> Path:
    if not (SHARED_DATA / "flood_days.csv").is_file():
        if IN_CI:
            pytest.fail(f"real data missing at {SHARED_DATA}")
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA
