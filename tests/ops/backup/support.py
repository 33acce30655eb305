"""Helpers for the backup, retention and worker tests: throw-away PostgreSQL databases with
real rows, and where a backup's manifest lies."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, insert, text

from ops.database import dispose_engines
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
