"""Registry tests run against SQLite (per-test FLOOD_HOME) and a fresh PostgreSQL database."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from core.settings import Settings, get_settings
from tests.conftest import fresh_postgres_database

# Before any test module imports mlflow: it decides about telemetry on first import.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="session")
def postgres_tracking_uri() -> Iterator[str]:
    with fresh_postgres_database("flood_test_registry") as url:
        yield url


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, flood_home: object) -> Settings:
    """Settings pointing at the backend; on PostgreSQL each test gets its own model name."""
    if request.param == "postgres":
        uri = request.getfixturevalue("postgres_tracking_uri")
        unique = f"flood-risk-{uuid.uuid4().hex[:8]}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("FLOOD_MODEL_NAME", unique)
        monkeypatch.setenv("FLOOD_EXPERIMENT", unique)
        get_settings.cache_clear()
    return get_settings()
