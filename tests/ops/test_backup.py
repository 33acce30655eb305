"""Backups of the embedded SQLite database: round trip, verify, retention, metrics, CLI."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from cli.main import app
from core.errors import BackupError
from core.settings import Settings, get_settings
from ops.backup import (
    BackupMetricsCollector,
    backup_summary,
    cleanup_backups,
    list_backups,
    resolve_backup,
    restore_backup,
    run_backup,
    select_expired,
    verify_backup,
)
from ops.migrations import head_revision, upgrade_database
from tests.ops.backup_support import insert_rows, table_counts


@pytest.fixture
def sqlite_url(settings: Settings) -> str:
    url = settings.effective_database_url
    upgrade_database(url)
    insert_rows(url, keys=12, predictions=250)
    return url


def scrape(collector: BackupMetricsCollector) -> dict[tuple[str, str], float]:
    """What Prometheus would read: (sample name, kind label) -> value."""
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (sample.name, sample.labels.get("kind", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def manifest_path(backup: Path) -> Path:
    return backup.with_name(backup.stem + ".manifest.json")


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


def test_cleanup_keeps_the_newest_of_each_kind(
    sqlite_url: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKUP_KEEP_FULL", "2")
    monkeypatch.setenv("BACKUP_KEEP_SCHEMA", "1")
    get_settings.cache_clear()
    fulls = [run_backup().file for _ in range(3)]
    schema = run_backup(kind="schema").file
    stale_partial = settings.backup_dir / "flood_20200101T000000Z_full.sqlite3.partial"
    stale_partial.write_bytes(b"x")
    os.utime(stale_partial, (0, 0))

    assert len(set(fulls)) == 3  # same-second backups wait for a free name
    removed = cleanup_backups()

    oldest = Path(fulls[0])
    assert sorted(removed) == sorted([oldest.name, oldest.stem + ".manifest.json", stale_partial.name])
    assert [m.file for m in list_backups()] == [schema, fulls[2], fulls[1]]


def test_select_expired_counts_each_kind_separately(sqlite_url: str) -> None:
    manifests = [run_backup(kind=kind) for kind in ("full", "schema", "full", "safety")]
    expired = select_expired(manifests, {"full": 1, "schema": 1, "safety": 1})
    assert expired == [manifests[0]]


def test_metrics_show_last_success_and_failures(
    sqlite_url: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = run_backup()
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{settings.flood_home / 'missing' / 'gone.db'}")
    get_settings.cache_clear()
    with pytest.raises(BackupError, match="does not exist"):
        run_backup()

    summary = backup_summary()
    assert summary.failures_total == 1 and "does not exist" in (summary.last_error or "")
    samples = scrape(BackupMetricsCollector())
    assert samples[("flood_backup_last_success_timestamp_seconds", "full")] == (
        manifest.created_at.timestamp()
    )
    assert samples[("flood_backup_last_size_bytes", "full")] == manifest.size_bytes
    assert samples[("flood_backup_last_duration_seconds", "full")] == manifest.duration_seconds
    assert samples[("flood_backup_files", "schema")] == 0
    assert samples[("flood_backup_failures_total", "")] == 1
    assert samples[("flood_backup_last_failure_timestamp_seconds", "")] >= manifest.created_at.timestamp()


def test_metrics_collector_survives_a_missing_backup_dir(tmp_path: Path) -> None:
    samples = scrape(BackupMetricsCollector(tmp_path / "nowhere"))
    assert samples[("flood_backup_failures_total", "")] == 0
    assert not any(name == "flood_backup_last_success_timestamp_seconds" for name, _ in samples)


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


def test_resolve_backup_explains_what_is_missing(settings: Settings) -> None:
    with pytest.raises(BackupError, match="no backups in"):
        resolve_backup(None)
    with pytest.raises(BackupError, match=r"no backup file nope\.dump"):
        resolve_backup("nope.dump")


def test_a_manifest_cannot_point_outside_the_backup_directory(
    sqlite_url: str, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crafted manifest naming ../../victim.txt made `flood backup cleanup` delete it."""
    monkeypatch.setenv("BACKUP_KEEP_FULL", "1")
    get_settings.cache_clear()
    victim = settings.flood_home / "victim.txt"
    victim.write_text("not a backup")
    first, second = run_backup(), run_backup()
    forged = json.loads(manifest_path(settings.backup_dir / first.file).read_text())
    forged["file"] = "../victim.txt"
    manifest_path(settings.backup_dir / first.file).write_text(json.dumps(forged))

    removed = cleanup_backups()

    assert victim.read_text() == "not a backup"
    assert "victim.txt" not in removed
    assert [m.file for m in list_backups()] == [second.file]  # the forged one is skipped, named in the log
    with pytest.raises(BackupError, match="not its own backup file"):
        verify_backup(settings.backup_dir / first.file)
