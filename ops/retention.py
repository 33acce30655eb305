"""Prediction-log retention: rows older than PREDICTION_LOG_RETENTION_DAYS leave the database.

In "archive" mode each run writes the expired rows to one gzipped JSON-lines file under
``backups/prediction-log/`` before deleting them; a batch is deleted only after it is on
disk (flushed and fsynced), so a crash can at worst archive a batch twice, never lose it.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

from sqlalchemy import Engine, delete, select

from core.settings import Settings, get_settings
from ops.database import get_engine
from ops.tables import PredictionLogRow

logger = logging.getLogger(__name__)

# One transaction per batch keeps locks short on a large log.
_BATCH_ROWS = 5000
ARCHIVE_SUBDIR = "prediction-log"


@dataclass(frozen=True)
class RetentionResult:
    cutoff: datetime
    rows_deleted: int
    archive: Path | None


def purge_prediction_log(
    *,
    settings: Settings | None = None,
    engine: Engine | None = None,
    now: datetime | None = None,
    batch_rows: int = _BATCH_ROWS,
) -> RetentionResult:
    """Archive (or just delete, by setting) prediction-log rows created before the cutoff."""
    settings = settings or get_settings()
    engine = engine or get_engine(settings.effective_database_url)
    cutoff = (now or datetime.now(UTC)) - timedelta(days=settings.prediction_log_retention_days)
    table = PredictionLogRow.__table__
    archive: Path | None = None
    handle: IO[str] | None = None
    deleted = 0
    with contextlib.ExitStack() as stack:
        while True:
            with engine.begin() as conn:
                rows = (
                    conn.execute(
                        select(table)
                        .where(table.c.created_at < cutoff)
                        .order_by(table.c.id)
                        .limit(batch_rows)
                    )
                    .mappings()
                    .all()
                )
                if not rows:
                    break
                if settings.prediction_log_retention_mode == "archive":
                    if handle is None:
                        archive = _archive_path(settings.backup_dir, cutoff)
                        # Owner-only, like the backups: the rows hold clients' inputs and key ids.
                        os.close(os.open(archive, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
                        handle = stack.enter_context(gzip.open(archive, "at", encoding="utf-8"))
                    for row in rows:
                        handle.write(json.dumps(dict(row), default=_json_default) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                ids = [row["id"] for row in rows]
                conn.execute(delete(PredictionLogRow).where(PredictionLogRow.id.in_(ids)))
                deleted += len(ids)
    logger.info(
        "prediction log retention: %d row(s) before %s removed%s",
        deleted,
        cutoff.isoformat(),
        f", archived to {archive}" if archive else "",
    )
    return RetentionResult(cutoff=cutoff, rows_deleted=deleted, archive=archive)


def _archive_path(backup_dir: Path, cutoff: datetime) -> Path:
    directory = backup_dir / ARCHIVE_SUBDIR
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return directory / f"prediction_log_before_{cutoff.strftime('%Y%m%d')}_{stamp}.jsonl.gz"


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)
