"""Backups of the real PostgreSQL: pg_dump/pg_restore round trip, verify, snapshot consistency,
authenticated manifests."""

from __future__ import annotations

import stat
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from core.errors import BackupError
from core.settings import Settings, get_settings
from ops.backup import list_backups, restore_backup, run_backup, verify_backup
from ops.migrations import head_revision
from tests.conftest import POSTGRES_URL
from tests.ops.backup.support import (
    create_revoked_key,
    insert_rows,
    key_state,
    reinstate_key_sql,
    rewrite_manifest,
    table_counts,
    upgraded_postgres_database,
    use_backup_key,
)

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_url(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with upgraded_postgres_database() as url:
        insert_rows(url, keys=20, predictions=400)
        monkeypatch.setenv("DATABASE_URL", url)
        get_settings.cache_clear()
        yield url


def scratch_databases() -> set[str]:
    engine = create_engine(POSTGRES_URL)
    with engine.connect() as connection:
        names = set(
            connection.execute(
                text("SELECT datname FROM pg_database WHERE datname LIKE 'flood_verify_%'")
            ).scalars()
        )
    engine.dispose()
    return names


def test_backup_wipe_restore_gives_equal_counts(pg_url: str, settings: Settings) -> None:
    before = table_counts(pg_url)
    manifest = run_backup()
    assert manifest.file.endswith("Z_full.dump") and manifest.engine == "postgresql"
    assert manifest.tables == before
    assert manifest.alembic_revision == head_revision()
    assert manifest.tool.startswith("pg_dump (PostgreSQL) ")
    # pg_dump writes into a file created owner-only, so the dump never was world-readable.
    assert stat.S_IMODE((settings.backup_dir / manifest.file).stat().st_mode) == 0o600

    engine = create_engine(pg_url)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE api_keys"))
        connection.execute(text("DELETE FROM prediction_log WHERE id % 2 = 0"))
    engine.dispose()

    scratch_before = scratch_databases()
    report = restore_backup(settings.backup_dir / manifest.file)

    assert table_counts(pg_url) == before
    assert report.differences == {}
    assert report.safety_backup.tables == {"prediction_log": 200, "flood_alembic_version": 1}
    assert scratch_databases() == scratch_before  # verify dropped its scratch database
    # The restored sequences continue after the restored ids: new rows still insert.
    insert_rows(pg_url, keys=1, predictions=1)


def test_verify_catches_truncated_and_altered_dumps(pg_url: str, settings: Settings) -> None:
    backup = settings.backup_dir / run_backup().file
    assert verify_backup(backup).restored_rows == table_counts(pg_url)
    original = backup.read_bytes()

    backup.write_bytes(original[:-100])
    with pytest.raises(BackupError, match="truncated"):
        verify_backup(backup)

    altered = bytearray(original)
    altered[len(altered) // 2] ^= 0x01
    backup.write_bytes(bytes(altered))
    with pytest.raises(BackupError, match="altered"):
        verify_backup(backup)


def test_schema_only_dump_restores_tables_and_revision_without_rows(pg_url: str, settings: Settings) -> None:
    manifest = run_backup(kind="schema")
    assert manifest.tables == {"api_keys": 0, "prediction_log": 0, "flood_alembic_version": 1}
    assert verify_backup(settings.backup_dir / manifest.file).restored_rows == manifest.tables


def test_counts_match_the_dump_while_rows_are_being_written(pg_url: str, settings: Settings) -> None:
    # The service writes the prediction log during the nightly backup; the manifest must
    # describe the dump's snapshot, not whatever the table held a moment earlier or later.
    stop = threading.Event()

    def write_continuously() -> None:
        while not stop.is_set():
            insert_rows(pg_url, keys=0, predictions=20)

    writer = threading.Thread(target=write_continuously)
    writer.start()
    try:
        manifests = [run_backup() for _ in range(2)]
    finally:
        stop.set()
        writer.join()

    counts = [m.tables["prediction_log"] for m in manifests]
    assert counts[0] < counts[1] <= table_counts(pg_url)["prediction_log"]
    for manifest in manifests:
        verify_backup(settings.backup_dir / manifest.file)


def test_postgres_backup_needs_a_postgres_url_to_verify(
    pg_url: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    backup = settings.backup_dir / run_backup().file
    monkeypatch.delenv("DATABASE_URL")
    get_settings.cache_clear()
    with pytest.raises(BackupError, match="needs DATABASE_URL to point at a PostgreSQL server"):
        verify_backup(backup)
    with pytest.raises(BackupError, match="postgresql backup but DATABASE_URL is sqlite"):
        restore_backup(backup)
    assert [m.kind for m in list_backups()] == ["full"]


def test_unreachable_server_is_a_clear_failure(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1:1/flood")
    get_settings.cache_clear()
    with pytest.raises(BackupError, match="cannot read database 'flood'"):
        run_backup()


def execute(url: str, sql: str) -> None:
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text(sql))
    engine.dispose()


@pytest.mark.security
def test_a_forged_dump_is_refused_and_the_revoked_key_stays_revoked(
    pg_url: str, settings: Settings, backup_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_id = create_revoked_key(pg_url)
    # The attacker's dump: a real pg_dump of the database with the key reinstated at
    # enterprise tier, and the manifest that goes with it, made where the key is not set.
    execute(pg_url, reinstate_key_sql(key_id))
    use_backup_key(monkeypatch, None)
    forged = settings.backup_dir / run_backup().file
    use_backup_key(monkeypatch, "attacker's own key")
    resigned = settings.backup_dir / run_backup().file
    execute(pg_url, f"UPDATE api_keys SET revoked_at = now(), tier = 'free' WHERE prefix = '{key_id}'")
    use_backup_key(monkeypatch, backup_key)
    before = table_counts(pg_url)
    scratch_before = scratch_databases()

    with pytest.raises(BackupError, match="is not signed but BACKUP_SIGNING_KEY is set"):
        verify_backup(forged)
    with pytest.raises(BackupError, match="is not signed but BACKUP_SIGNING_KEY is set"):
        restore_backup(forged)
    with pytest.raises(BackupError, match="does not match its signature"):
        restore_backup(resigned)

    assert key_state(pg_url, key_id) == ("free", True)
    assert table_counts(pg_url) == before
    assert scratch_databases() == scratch_before
    assert {m.kind for m in list_backups()} == {"full"}  # no safety backup


@pytest.mark.security
def test_a_signed_dump_restores_and_any_change_or_another_key_is_refused(
    pg_url: str, settings: Settings, backup_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = run_backup()
    backup = settings.backup_dir / manifest.file
    assert manifest.signature is not None
    assert verify_backup(backup).authenticated is True

    before = table_counts(pg_url)
    insert_rows(pg_url, keys=3, predictions=10)
    report = restore_backup(backup)
    assert report.authenticated is True and report.safety_backup.signature is not None
    assert table_counts(pg_url) == before

    original = backup.read_bytes()
    rewrite_manifest(backup, lambda d: d["tables"].update(api_keys=d["tables"]["api_keys"] + 1))
    with pytest.raises(BackupError, match="does not match its signature"):
        restore_backup(backup)
    rewrite_manifest(backup, lambda d: d["tables"].update(api_keys=d["tables"]["api_keys"] - 1))
    altered = bytearray(original)
    altered[len(altered) // 2] ^= 0x01
    backup.write_bytes(bytes(altered))
    with pytest.raises(BackupError, match="altered"):
        restore_backup(backup)
    backup.write_bytes(original)

    use_backup_key(monkeypatch, backup_key[::-1])
    with pytest.raises(BackupError, match="neither BACKUP_SIGNING_KEY nor in BACKUP_SIGNING_KEY_PREVIOUS"):
        restore_backup(backup)
    assert table_counts(pg_url) == before
    assert [m.kind for m in list_backups()].count("safety") == 1  # only the real restore's
    use_backup_key(monkeypatch, backup_key)
    assert verify_backup(backup).restored_rows == before
