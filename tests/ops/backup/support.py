"""Helpers for the backup, retention and worker tests: throw-away PostgreSQL databases with
real rows, where a backup's manifest lies, and what an attacker does to a backup."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, insert, text

from core.settings import get_settings
from ops.database import dispose_engines, get_session_factory
from ops.keys import ApiKeyStore
from ops.migrations import upgrade_database
from ops.tables import ApiKey, PredictionLogRow
from tests.conftest import fresh_postgres_database


@contextlib.contextmanager
def upgraded_postgres_database() -> Iterator[str]:
    """A new database at the test server, schema upgraded, dropped afterwards."""
    with fresh_postgres_database("flood_backup") as test_url:
        try:
            upgrade_database(test_url)
            yield test_url
        finally:
            dispose_engines()


def insert_rows(url: str, *, keys: int, predictions: int, days_old: float = 0.0) -> None:
    """Realistic rows in both ops tables (``days_old`` back-dates the predictions)."""
    created = datetime.now(UTC) - timedelta(days=days_old)
    engine = create_engine(url)
    with engine.begin() as connection:
        if keys:
            connection.execute(
                insert(ApiKey),
                [
                    {
                        "prefix": f"fnq_{uuid.uuid4().hex[:12]}",
                        "key_hash": uuid.uuid4().hex * 2,
                        "name": f"client-{i}",
                        "tier": "free",
                        "created_at": created,
                    }
                    for i in range(keys)
                ],
            )
        if predictions:
            connection.execute(
                insert(PredictionLogRow),
                [
                    {
                        "request_id": uuid.uuid4().hex,
                        "created_at": created - timedelta(seconds=i),
                        "key_id": "fnq_0123456789ab",
                        "inputs": {"temperature": 28.0, "humidity": 80.0 + i % 10, "rainfall": i / 3},
                        "probability": (i % 100) / 100,
                        "risk_level": ("Safe", "Alert", "Critical")[i % 3],
                        "model_version": "3",
                        "bento_tag": "flood_risk:abc",
                        "latency_ms": 3.5,
                    }
                    for i in range(predictions)
                ],
            )
    engine.dispose()


def table_counts(url: str) -> dict[str, int]:
    engine = create_engine(url)
    with engine.connect() as connection:
        counts = {
            table: int(connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
            for table in ("api_keys", "prediction_log", "flood_alembic_version")
        }
    engine.dispose()
    return counts


def manifest_path(backup: Path) -> Path:
    return backup.with_name(backup.stem + ".manifest.json")


def rewrite_manifest(backup: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit the manifest beside ``backup`` as JSON, the way anyone with write access could."""
    path = manifest_path(backup)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def use_backup_key(monkeypatch: pytest.MonkeyPatch, key: str | None) -> None:
    if key is None:
        monkeypatch.delenv("BACKUP_SIGNING_KEY", raising=False)
    else:
        monkeypatch.setenv("BACKUP_SIGNING_KEY", key)
    get_settings.cache_clear()


def create_revoked_key(url: str) -> str:
    """A free-tier key, revoked; returns its id (prefix)."""
    store = ApiKeyStore(session_factory=get_session_factory(url), secret=b"s" * 40, cache_seconds=0)
    key_id = store.create_key("revoked-client", "free").info.key_id
    store.revoke_key(key_id)
    return key_id


def key_state(url: str, key_id: str) -> tuple[str, bool]:
    """(tier, revoked) of a key, read straight from the database."""
    engine = create_engine(url)
    with engine.connect() as connection:
        tier, revoked_at = connection.execute(
            text("SELECT tier, revoked_at FROM api_keys WHERE prefix = :prefix"), {"prefix": key_id}
        ).one()
    engine.dispose()
    return str(tier), revoked_at is not None


def reinstate_key_sql(key_id: str) -> str:
    """The attacker's edit: the revoked key active again, at enterprise tier."""
    return f"UPDATE api_keys SET revoked_at = NULL, tier = 'enterprise' WHERE prefix = '{key_id}'"
