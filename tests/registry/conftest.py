"""Registry tests run against SQLite (per-test FLOOD_HOME) and a fresh PostgreSQL database."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import make_url

from core.settings import Settings, get_settings
from tests.conftest import POSTGRES_URL, require_service

# Before any test module imports mlflow: it decides about telemetry on first import.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="session")
def postgres_tracking_uri() -> Iterator[str]:
    import psycopg2

    url = make_url(POSTGRES_URL)
    require_service("PostgreSQL", url.host or "127.0.0.1", url.port or 5432)
    database = f"flood_test_registry_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(
        host=url.host, port=url.port, user=url.username, password=url.password, dbname=url.database
    )
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{database}"')
    try:
        yield url.set(database=database).render_as_string(hide_password=False)
    finally:
        with admin.cursor() as cursor:
            # MLflow keeps pooled connections open for the life of the process.
            cursor.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()


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
