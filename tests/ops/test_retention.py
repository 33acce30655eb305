"""Prediction-log retention on SQLite and PostgreSQL: archive then delete, or just delete."""

from __future__ import annotations

import gzip
import json

import pytest
from sqlalchemy import create_engine, select

from core.settings import Settings, get_settings
from ops.migrations import upgrade_database
from ops.retention import purge_prediction_log
from ops.tables import PredictionLogRow
from tests.ops.backup.support import insert_rows, table_counts


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "sqlite":
        url = settings.effective_database_url
        upgrade_database(url)
    else:
        url = request.getfixturevalue("postgres_url")
        monkeypatch.setenv("DATABASE_URL", url)
        get_settings.cache_clear()
    return url


def request_ids(url: str) -> set[str]:
    engine = create_engine(url)
    with engine.connect() as connection:
        ids = set(connection.scalars(select(PredictionLogRow.request_id)))
    engine.dispose()
    return ids


def test_expired_rows_are_archived_then_deleted(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREDICTION_LOG_RETENTION_DAYS", "30")
    get_settings.cache_clear()
    insert_rows(database_url, keys=0, predictions=40, days_old=45)
    expired = request_ids(database_url)
    insert_rows(database_url, keys=0, predictions=25, days_old=1)
    kept = request_ids(database_url) - expired

    result = purge_prediction_log(batch_rows=7)  # several batches into one archive

    assert result.rows_deleted == 40
    assert request_ids(database_url) == kept
    assert (
        result.archive is not None and result.archive.parent == get_settings().backup_dir / "prediction-log"
    )
    with gzip.open(result.archive, "rt", encoding="utf-8") as handle:
        archived = [json.loads(line) for line in handle]
    assert {row["request_id"] for row in archived} == expired
    assert all(row["inputs"]["temperature"] == 28.0 for row in archived)

    again = purge_prediction_log()
    assert again.rows_deleted == 0 and again.archive is None


def test_delete_mode_keeps_no_archive(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREDICTION_LOG_RETENTION_DAYS", "7")
    monkeypatch.setenv("PREDICTION_LOG_RETENTION_MODE", "delete")
    get_settings.cache_clear()
    insert_rows(database_url, keys=2, predictions=10, days_old=8)
    insert_rows(database_url, keys=0, predictions=3, days_old=6)

    result = purge_prediction_log()

    assert result.rows_deleted == 10 and result.archive is None
    assert table_counts(database_url)["prediction_log"] == 3
    assert table_counts(database_url)["api_keys"] == 2  # retention touches only the log
