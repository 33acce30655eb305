"""The backup catalogue: retention, resolving names, forged manifests, and the metrics read from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from core.errors import BackupError
from core.settings import Settings, get_settings
from ops.backup import (
    backup_summary,
    cleanup_backups,
    list_backups,
    resolve_backup,
    run_backup,
    select_expired,
    verify_backup,
)
from serving.metrics import BackupMetricsCollector
from tests.ops.backup.support import manifest_path


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


def test_scraping_the_catalogue_loads_no_backup_engine(settings: Settings) -> None:
    # /metrics reads the catalogue at every scrape; the engines (SQLAlchemy, Alembic) are the
    # backup run's, not the API workers'. (ops.backup.signature is hmac and json only.)
    code = (
        "import sys; from serving.metrics import scrape_time_metrics; scrape_time_metrics(); "
        "print(sorted(m for m in sys.modules if m.startswith('ops.backup.')))"
    )
    root = Path(__file__).resolve().parents[3]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert result.stdout.strip() == "['ops.backup.catalogue', 'ops.backup.signature']"


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
