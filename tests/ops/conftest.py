"""Ops fixtures: one throw-away PostgreSQL database per session, unique Redis key prefixes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import redis
from sqlalchemy import create_engine, text

from ops.database import dispose_engines
from ops.migrations import upgrade_database
from tests.conftest import REDIS_URL, fresh_postgres_database, require_service


@pytest.fixture(autouse=True)
def _dispose_engines() -> Iterator[None]:
    yield
    dispose_engines()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """URL of a database created for this session and dropped after it, schema upgraded."""
    with fresh_postgres_database("flood_ops") as test_url:
        upgrade_database(test_url)
        dispose_engines()
        yield test_url
        dispose_engines()


@pytest.fixture
def postgres_url(postgres_database: str) -> str:
    """The session database with empty tables."""
    engine = create_engine(postgres_database)
    with engine.begin() as connection:
        connection.execute(text("TRUNCATE api_keys, prediction_log RESTART IDENTITY"))
    engine.dispose()
    return postgres_database


@pytest.fixture
def redis_url() -> str:
    parts = urlsplit(REDIS_URL)
    require_service("Redis", parts.hostname or "127.0.0.1", parts.port or 6379)
    return REDIS_URL


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A synchronous client to the test Redis, for looking behind the limiter."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def redis_prefix(redis_client: redis.Redis) -> Iterator[str]:
    prefix = f"flood-test-{uuid.uuid4().hex}"
    yield prefix
    keys = list(redis_client.scan_iter(match=f"{prefix}:*"))
    if keys:
        redis_client.delete(*keys)
