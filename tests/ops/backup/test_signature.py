"""Authenticated manifests on SQLite: the finding "backups can be forged" reproduced and refused,
signed backups round-trip, any change after signing or another key is refused.
(PostgreSQL: the same in test_postgres.py.)"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core.checksum import sha256_file
from core.errors import BackupError
from core.settings import Settings, get_settings
from ops.backup import list_backups, restore_backup, run_backup, verify_backup
from ops.backup.catalogue import BackupManifest, free_name, manifest_name
from ops.backup.signature import sign_manifest
from ops.backup.sqlite import SqliteBackend
from ops.migrations import head_revision
from tests.conftest import run_flood
from tests.ops.backup.support import (
    create_revoked_key,
    key_state,
    manifest_path,
    reinstate_key_sql,
    rewrite_manifest,
    table_counts,
    use_backup_key,
)

pytestmark = pytest.mark.security

NOT_SIGNED = r"is not signed but BACKUP_SIGNING_KEY is set: anyone who can write the backup folder"
MISMATCH = r"does not match its signature"


def forge_sqlite_backup(settings: Settings, sql: str, *, signing_key: bytes | None = None) -> Path:
    """What the finding's attacker puts in the backup folder: a copy of the database changed
    by ``sql``, and a manifest written to match it (size, sha256, row counts, revision)."""
    database = settings.flood_home / "flood.db"
    settings.backup_dir.mkdir(parents=True, exist_ok=True)
    created_at, dump = free_name(settings.backup_dir, kind="full", suffix=".sqlite3")
    with (
        contextlib.closing(sqlite3.connect(database)) as src,
        contextlib.closing(sqlite3.connect(dump)) as dst,
    ):
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")
        dst.execute(sql)
        dst.commit()
    manifest = BackupManifest(
        file=dump.name,
        kind="full",
        engine="sqlite",
        database=database.name,
        created_at=created_at,
        duration_seconds=0.2,
        size_bytes=dump.stat().st_size,
        sha256=sha256_file(dump),
        alembic_revision=head_revision(),
        tables=table_counts(f"sqlite:///{dump}"),
        tool=f"sqlite3 {sqlite3.sqlite_version}",
    )
    if signing_key is not None:
        manifest = sign_manifest(manifest, signing_key)
    manifest_path(dump).write_text(manifest.to_json())
    return dump


def refuse_scratch_restore(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal must come before the dump is even opened as a database."""

    def reached(self: SqliteBackend, path: Path) -> dict[str, int]:
        raise AssertionError(f"scratch restore of {path.name} reached before the signature check")

    monkeypatch.setattr(SqliteBackend, "restore_scratch", reached)


@pytest.fixture
def no_scratch_restore(monkeypatch: pytest.MonkeyPatch) -> None:
    refuse_scratch_restore(monkeypatch)


def test_the_forged_dump_of_the_finding_is_refused_and_the_revoked_key_stays_revoked(
    sqlite_url: str,
    settings: Settings,
    backup_key: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key_id = create_revoked_key(sqlite_url)
    database = settings.flood_home / "flood.db"
    before = sha256_file(database)
    unsigned = forge_sqlite_backup(settings, reinstate_key_sql(key_id))
    resigned = forge_sqlite_backup(settings, reinstate_key_sql(key_id), signing_key=b"attacker's own key")
    # The forgery is a good one: without a key it passes verify, as in the finding.
    use_backup_key(monkeypatch, None)
    assert verify_backup(unsigned).authenticated is False
    use_backup_key(monkeypatch, backup_key)

    with pytest.raises(BackupError, match=NOT_SIGNED):
        verify_backup(unsigned)
    with pytest.raises(BackupError, match=MISMATCH):
        verify_backup(resigned)
    with monkeypatch.context() as patched:
        refuse_scratch_restore(patched)
        with pytest.raises(BackupError, match=NOT_SIGNED):
            restore_backup(unsigned)
        with pytest.raises(BackupError, match=MISMATCH):
            restore_backup(resigned)

    capsys.readouterr()
    assert run_flood(["backup", "verify", unsigned.name], monkeypatch) == 1
    err = capsys.readouterr().err
    assert f"error: {manifest_name(unsigned.name)} is not signed but BACKUP_SIGNING_KEY is set" in err
    assert "flood backup run" in err and "Traceback" not in err
    assert run_flood(["backup", "restore", resigned.name, "--yes"], monkeypatch) == 1
    assert f"error: {manifest_name(resigned.name)} does not match its signature" in capsys.readouterr().err

    assert key_state(sqlite_url, key_id) == ("free", True)
    assert sha256_file(database) == before  # the database file was not even written
    assert {m.kind for m in list_backups()} == {"full"}  # and no safety backup was taken


def test_a_signed_backup_verifies_and_restores(
    sqlite_url: str,
    settings: Settings,
    backup_key: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest = run_backup()
    backup = settings.backup_dir / manifest.file
    recorded = json.loads(manifest_path(backup).read_text())
    assert manifest.signature is not None and len(manifest.signature) == 64
    assert recorded["signature"] == manifest.signature and recorded["format_version"] == 2

    assert verify_backup(backup).authenticated is True
    counts = table_counts(sqlite_url)
    key_id = create_revoked_key(sqlite_url)
    report = restore_backup(backup)
    assert report.authenticated is True
    assert table_counts(sqlite_url) == counts
    # The safety backup is signed too, so the restore can be undone under the same rules.
    assert report.safety_backup.signature is not None
    safety = settings.backup_dir / report.safety_backup.file
    assert verify_backup(safety).restored_rows["api_keys"] == counts["api_keys"] + 1
    restore_backup(safety)
    assert key_state(sqlite_url, key_id) == ("free", True)

    capsys.readouterr()
    assert run_flood(["backup", "verify", backup.name], monkeypatch) == 0
    out, err = capsys.readouterr()
    assert f"ok: {backup.name} (signature valid, sha256 matches" in out
    assert "not authenticated" not in err


def _later_same_wall_time(data: dict[str, Any]) -> None:
    data["created_at"] = data["created_at"].replace("Z", "+08:00")


FIELD_CHANGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "kind": lambda d: d.update(kind="safety"),
    "engine": lambda d: d.update(engine="postgresql"),
    "database": lambda d: d.update(database="other.db"),
    "created_at": _later_same_wall_time,
    "duration_seconds": lambda d: d.update(duration_seconds=d["duration_seconds"] + 1),
    "size_bytes": lambda d: d.update(size_bytes=d["size_bytes"] + 1),
    "sha256": lambda d: d.update(sha256="0" * 64),
    "alembic_revision": lambda d: d.update(alembic_revision="0001"),
    "tables": lambda d: d["tables"].update(api_keys=d["tables"]["api_keys"] + 1),
    "tool": lambda d: d.update(tool="sqlite3 3.0.0"),
    "format_version": lambda d: d.update(format_version=1),
    "signature": lambda d: d.update(
        signature=("1" if d["signature"][0] != "1" else "2") + d["signature"][1:]
    ),
}


@pytest.mark.parametrize("field", sorted(FIELD_CHANGES))
def test_changing_any_manifest_field_after_signing_is_refused(
    sqlite_url: str, settings: Settings, backup_key: str, field: str, no_scratch_restore: None
) -> None:
    backup = settings.backup_dir / run_backup().file
    before = table_counts(sqlite_url)
    rewrite_manifest(backup, FIELD_CHANGES[field])

    with pytest.raises(BackupError, match=MISMATCH):
        verify_backup(backup)
    with pytest.raises(BackupError, match=MISMATCH):
        restore_backup(backup)
    assert table_counts(sqlite_url) == before
    assert [m.file for m in list_backups()] == [backup.name]  # no safety backup was taken


def test_renaming_a_signed_backup_or_dropping_its_signature_is_refused(
    sqlite_url: str, settings: Settings, backup_key: str, no_scratch_restore: None
) -> None:
    backup = settings.backup_dir / run_backup().file
    # Both files renamed and the manifest's `file` edited to match: the name is signed too.
    renamed = backup.with_name(backup.name.replace("_full.", "_schema."))
    backup.rename(renamed)
    manifest_path(backup).rename(manifest_path(renamed))
    rewrite_manifest(renamed, lambda d: d.update(file=renamed.name, kind="schema"))
    with pytest.raises(BackupError, match=MISMATCH):
        verify_backup(renamed)

    rewrite_manifest(renamed, lambda d: d.update(signature=None))
    with pytest.raises(BackupError, match=NOT_SIGNED):
        verify_backup(renamed)
    rewrite_manifest(renamed, lambda d: d.pop("signature"))  # a format 1 manifest has none
    with pytest.raises(BackupError, match=NOT_SIGNED):
        restore_backup(renamed)


def test_a_dump_changed_after_signing_is_refused(
    sqlite_url: str, settings: Settings, backup_key: str
) -> None:
    backup = settings.backup_dir / run_backup().file
    before = table_counts(sqlite_url)
    altered = bytearray(backup.read_bytes())
    altered[len(altered) // 2] ^= 0x01
    backup.write_bytes(bytes(altered))
    with pytest.raises(BackupError, match=r"sha256 .* altered"):
        verify_backup(backup)
    with pytest.raises(BackupError, match=r"sha256 .* altered"):
        restore_backup(backup)

    # The manifest brought in line with the changed dump: its signature no longer matches.
    rewrite_manifest(backup, lambda d: d.update(sha256=sha256_file(backup), size_bytes=backup.stat().st_size))
    with pytest.raises(BackupError, match=MISMATCH):
        restore_backup(backup)
    assert table_counts(sqlite_url) == before
    assert [m.kind for m in list_backups()] == ["full"]


def test_another_key_is_refused_and_the_signing_key_still_verifies(
    sqlite_url: str, settings: Settings, backup_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backup = settings.backup_dir / run_backup().file
    use_backup_key(monkeypatch, backup_key[::-1])  # after a rotation, say
    with pytest.raises(BackupError, match=r"neither BACKUP_SIGNING_KEY nor in BACKUP_SIGNING_KEY_PREVIOUS"):
        verify_backup(backup)
    with pytest.raises(BackupError, match=MISMATCH):
        restore_backup(backup)
    assert [m.kind for m in list_backups()] == ["full"]
    use_backup_key(monkeypatch, backup_key)
    assert verify_backup(backup).authenticated is True


def test_during_a_rotation_backups_under_the_previous_key_restore_and_new_ones_use_the_new_key(
    sqlite_url: str,
    settings: Settings,
    backup_key: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = settings.backup_dir / run_backup().file
    new_key = backup_key[::-1]
    use_backup_key(monkeypatch, new_key)
    monkeypatch.setenv("BACKUP_SIGNING_KEY_PREVIOUS", json.dumps([backup_key]))
    get_settings.cache_clear()
    with caplog.at_level(logging.WARNING, logger="ops.backup.signature"):
        assert verify_backup(old).authenticated is True
    assert "signed with a key of BACKUP_SIGNING_KEY_PREVIOUS" in caplog.text
    report = restore_backup(old)
    # The safety backup taken by that restore is signed with the new key only.
    safety = settings.backup_dir / report.safety_backup.file
    monkeypatch.delenv("BACKUP_SIGNING_KEY_PREVIOUS")
    get_settings.cache_clear()
    assert verify_backup(safety).authenticated is True
    with pytest.raises(BackupError, match=MISMATCH):
        verify_backup(old)  # the rotation's end: the old key is no longer listed


def test_without_a_key_backups_are_unsigned_and_reported_unauthenticated(
    sqlite_url: str,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert get_settings().backup_signing_key is None
    manifest = run_backup()
    backup = settings.backup_dir / manifest.file
    assert manifest.signature is None
    assert json.loads(manifest_path(backup).read_text())["signature"] is None

    with caplog.at_level(logging.WARNING, logger="ops.backup.signature"):
        report = verify_backup(backup)
    assert report.authenticated is False
    assert f"{manifest_name(backup.name)} is not authenticated: BACKUP_SIGNING_KEY is not set" in caplog.text
    assert restore_backup(backup).authenticated is False

    capsys.readouterr()
    assert run_flood(["backup", "verify", backup.name], monkeypatch) == 0
    out, err = capsys.readouterr()
    assert f"ok: {backup.name} (sha256 matches" in out and "signature valid" not in out
    assert "warning: manifest not authenticated (BACKUP_SIGNING_KEY is not set)" in err


def test_a_dump_swapped_after_the_check_is_not_what_gets_restored(
    sqlite_url: str, settings: Settings, backup_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever can write the backup folder swaps the verified file for a forgery between the
    signature check and the restore (injected right after the check): the restore must use
    the bytes it checked, not re-read the file."""
    import ops.backup

    key_id = create_revoked_key(sqlite_url)
    backup = settings.backup_dir / run_backup().file
    forged = forge_sqlite_backup(settings, reinstate_key_sql(key_id)).read_bytes()
    check = ops.backup._verify
    swapped: list[Path] = []

    def check_then_swap(path: Path, *args: Any, **kwargs: Any) -> Any:
        report = check(path, *args, **kwargs)
        backup.write_bytes(forged)
        swapped.append(path)
        return report

    monkeypatch.setattr(ops.backup, "_verify", check_then_swap)
    restore_backup(backup)
    assert swapped and backup.read_bytes() == forged  # the swap happened, after the check
    assert key_state(sqlite_url, key_id)[1] is True, "the swapped-in forgery was restored"
