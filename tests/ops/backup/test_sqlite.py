"""Backups of the embedded SQLite database: round trip, verify, schema-only, the CLI."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import stat

import pytest
from typer.testing import CliRunner

from cli.main import app
from core.errors import BackupError
from core.settings import Settings
from ops.backup import list_backups, restore_backup, run_backup, verify_backup
from ops.migrations import head_revision
from tests.ops.backup.support import insert_rows, manifest_path, table_counts


def test_backup_wipe_restore_gives_equal_counts(sqlite_url: str, settings: Settings) -> None:
    before = table_counts(sqlite_url)
    manifest = run_backup()
    backup = settings.backup_dir / manifest.file

    assert manifest.file.startswith("flood_") and manifest.file.endswith("Z_full.sqlite3")
    assert manifest.tables == before
    assert manifest.alembic_revision == head_revision()
    assert manifest.engine == "sqlite" and manifest.size_bytes == backup.stat().st_size
    assert json.loads(manifest_path(backup).read_text())["sha256"] == manifest.sha256
    # Key hashes and the prediction log: readable by the owner only.
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert stat.S_IMODE(manifest_path(backup).stat().st_mode) == 0o600
    assert stat.S_IMODE(settings.backup_dir.stat().st_mode) == 0o700

    with contextlib.closing(sqlite3.connect(settings.flood_home / "flood.db")) as db:
        db.execute("DELETE FROM prediction_log")
        db.execute("DROP TABLE api_keys")
        db.commit()
    report = restore_backup(backup)

    assert table_counts(sqlite_url) == before
    assert report.differences == {}
    # The safety backup holds the wiped state, so the restore itself can be undone.
    assert report.safety_backup.kind == "safety"
    assert report.safety_backup.tables == {"flood_alembic_version": 1, "prediction_log": 0}


def test_verify_catches_truncated_and_altered_files(sqlite_url: str, settings: Settings) -> None:
    backup = settings.backup_dir / run_backup().file
    assert verify_backup(backup).restored_rows["prediction_log"] == 250
    original = backup.read_bytes()

    backup.write_bytes(original[: len(original) // 2])
    with pytest.raises(BackupError, match="truncated"):
        verify_backup(backup)

    altered = bytearray(original)
    altered[len(altered) // 2] ^= 0xFF
    backup.write_bytes(bytes(altered))
    with pytest.raises(BackupError, match=r"sha256 .* altered"):
        verify_backup(backup)

    # A manifest that lies about the rows is caught by the scratch restore, not the checksum.
    backup.write_bytes(original)
    manifest = json.loads(manifest_path(backup).read_text())
    manifest["tables"]["prediction_log"] = 251
    manifest_path(backup).write_text(json.dumps(manifest))
    with pytest.raises(BackupError, match=r"prediction_log: manifest 251, restored 250"):
        verify_backup(backup)

    manifest_path(backup).unlink()
    with pytest.raises(BackupError, match="no manifest"):
        verify_backup(backup)


def test_restore_refuses_a_file_that_fails_verify(sqlite_url: str, settings: Settings) -> None:
    backup = settings.backup_dir / run_backup().file
    insert_rows(sqlite_url, keys=1, predictions=5)
    current = table_counts(sqlite_url)
    backup.write_bytes(backup.read_bytes()[:-4096])

    with pytest.raises(BackupError, match="truncated"):
        restore_backup(backup)
    assert table_counts(sqlite_url) == current
    assert [m.kind for m in list_backups()] == ["full"]  # no safety backup either


def test_schema_only_backup_keeps_revision_not_rows(sqlite_url: str, settings: Settings) -> None:
    manifest = run_backup(kind="schema")
    assert manifest.file.endswith("_schema.sqlite3")
    assert manifest.tables == {"api_keys": 0, "prediction_log": 0, "flood_alembic_version": 1}
    assert manifest.alembic_revision == head_revision()
    assert verify_backup(settings.backup_dir / manifest.file).restored_rows == manifest.tables


def test_cli_run_list_verify_restore(sqlite_url: str, settings: Settings) -> None:
    runner = CliRunner()
    ran = runner.invoke(app, ["backup", "run"])
    assert ran.exit_code == 0, ran.output
    (backup,) = list_backups()
    assert backup.file in ran.output and "prediction_log=250" in ran.output

    listed = runner.invoke(app, ["backup", "list"])
    assert listed.exit_code == 0 and backup.file in listed.output

    verified = runner.invoke(app, ["backup", "verify"])
    assert verified.exit_code == 0 and f"ok: {backup.file}" in verified.output

    insert_rows(sqlite_url, keys=0, predictions=7)
    declined = runner.invoke(app, ["backup", "restore", backup.file], input="n\n")
    assert declined.exit_code != 0
    assert table_counts(sqlite_url)["prediction_log"] == 257

    restored = runner.invoke(app, ["backup", "restore", backup.file, "--yes"])
    assert restored.exit_code == 0, restored.output
    assert table_counts(sqlite_url)["prediction_log"] == 250
    assert "safety backup: flood_" in restored.output
