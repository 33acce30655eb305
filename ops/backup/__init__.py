"""Backups of the ops database: the one implementation behind ``flood backup`` and the Celery tasks.

PostgreSQL is dumped with ``pg_dump`` inside an exported snapshot (:mod:`ops.backup.postgres`),
SQLite is copied with the online backup API (:mod:`ops.backup.sqlite`). Every backup file has
a manifest beside it, written last (:mod:`ops.backup.catalogue`) and signed with
BACKUP_SIGNING_KEY when it is set (:mod:`ops.backup.signature`).

``verify`` checks the manifest's signature and the file's sha256, then restores into a
scratch database, comparing row counts with the manifest; ``restore`` refuses what fails
verify, checking the signature before anything else, and takes a safety backup first. Failures
are counted in ``state.json`` beside the backups; ``serving.metrics.BackupMetricsCollector``
turns the catalogue and that file into Prometheus gauges.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from core.checksum import sha256_file
from core.errors import BackupError
from core.settings import Settings, get_settings
from ops.backup.catalogue import (
    KINDS,
    MANIFEST_SUFFIX,
    PARTIAL_SUFFIX,
    PREFIX,
    STATE_FILE,
    BackupKind,
    BackupManifest,
    BackupSummary,
    backup_summary,
    free_name,
    list_backups,
    manifest_for,
    manifest_name,
    record_failure,
    resolve_backup,
    select_expired,
    write_atomically,
)
from ops.backup.signature import (
    authenticate_manifest,
    backup_signing_key,
    previous_backup_signing_keys,
    sign_manifest,
)

if TYPE_CHECKING:
    from ops.backup.engine import Backend

__all__ = [
    "KINDS",
    "MANIFEST_SUFFIX",
    "STATE_FILE",
    "BackupKind",
    "BackupManifest",
    "BackupSummary",
    "RestoreReport",
    "VerifyReport",
    "backup_summary",
    "cleanup_backups",
    "list_backups",
    "resolve_backup",
    "restore_backup",
    "run_backup",
    "select_expired",
    "verify_backup",
]

logger = logging.getLogger(__name__)

_STALE_PARTIAL = timedelta(days=1)


@dataclass(frozen=True)
class VerifyReport:
    path: Path
    manifest: BackupManifest
    restored_rows: dict[str, int]
    # False: no BACKUP_SIGNING_KEY here, so the manifest could have been forged.
    authenticated: bool


@dataclass(frozen=True)
class RestoreReport:
    path: Path
    manifest: BackupManifest
    safety_backup: BackupManifest
    restored_rows: dict[str, int]
    authenticated: bool
    # Tables whose count differs from the manifest right after the restore: only possible
    # when something wrote to the database meanwhile.
    differences: dict[str, tuple[int, int]] = field(default_factory=dict)


def run_backup(*, kind: BackupKind = "full", settings: Settings | None = None) -> BackupManifest:
    """Back up the database at settings.effective_database_url into settings.backup_dir."""
    settings = settings or get_settings()
    if kind not in KINDS:
        raise BackupError(f"unknown backup kind {kind!r}; expected one of {', '.join(KINDS)}")
    try:
        return _run_backup(kind, settings)
    except BackupError as exc:
        record_failure(settings.backup_dir, kind=kind, error=str(exc))
        raise
    except OSError as exc:  # disk full, permissions: the operator's to fix, not a bug
        record_failure(settings.backup_dir, kind=kind, error=str(exc))
        raise BackupError(f"{kind} backup could not be written: {exc}") from exc
    except Exception as exc:
        # Anything else is a bug: counted for the alert, raised with its traceback.
        record_failure(settings.backup_dir, kind=kind, error=f"{type(exc).__name__}: {exc}")
        raise


def verify_backup(path: Path, *, settings: Settings | None = None) -> VerifyReport:
    """Check the manifest's signature and the file's sha256, restore it into a scratch
    database and compare row counts.

    Raises :class:`BackupError` with the reason when anything does not match.
    """
    settings = settings or get_settings()
    manifest, authenticated = _read_manifest(path, settings)
    return _verify(path, manifest, authenticated=authenticated, settings=settings)


def _read_manifest(path: Path, settings: Settings) -> tuple[BackupManifest, bool]:
    manifest = manifest_for(path)
    return manifest, authenticate_manifest(
        manifest, key=backup_signing_key(settings), previous=previous_backup_signing_keys(settings)
    )


def _verify(path: Path, manifest: BackupManifest, *, authenticated: bool, settings: Settings) -> VerifyReport:
    size = path.stat().st_size
    if size != manifest.size_bytes:
        raise BackupError(
            f"{path.name} is {size} bytes but its manifest says {manifest.size_bytes}: "
            "the file is truncated or altered"
        )
    digest = sha256_file(path)
    if digest != manifest.sha256:
        raise BackupError(
            f"{path.name} has sha256 {digest[:16]}… but its manifest says {manifest.sha256[:16]}…: "
            "the file is altered"
        )
    restored = _backend_for_manifest(manifest, settings).restore_scratch(path)
    missing = sorted(set(manifest.tables) - set(restored))
    if missing:
        raise BackupError(f"{path.name} restored without table(s) {', '.join(missing)}")
    wrong = {t: (n, restored[t]) for t, n in manifest.tables.items() if restored[t] != n}
    if wrong:
        detail = ", ".join(f"{t}: manifest {a}, restored {b}" for t, (a, b) in sorted(wrong.items()))
        raise BackupError(f"{path.name} restored with different row counts ({detail})")
    logger.info(
        "verified %s: %d tables, sha256 ok, %s",
        path.name,
        len(restored),
        "signature ok" if authenticated else "manifest not authenticated",
    )
    return VerifyReport(path=path, manifest=manifest, restored_rows=restored, authenticated=authenticated)


def restore_backup(path: Path, *, settings: Settings | None = None) -> RestoreReport:
    """Replace the database's contents with ``path`` after verifying it and backing up the
    current state. Asking for confirmation is the caller's job."""
    settings = settings or get_settings()
    # The signature first: a forged manifest must not reach the database, a scratch restore
    # or the safety backup (which would take a retention slot from a real one).
    manifest, authenticated = _read_manifest(path, settings)
    backend = _backend(settings)
    if backend.engine != manifest.engine:
        raise BackupError(f"{path.name} is a {manifest.engine} backup but DATABASE_URL is {backend.engine}")
    # Verified and restored from one private copy: whoever can write the backup folder could
    # otherwise swap the file between the check and the restore.
    with tempfile.TemporaryDirectory(prefix="flood-restore-") as private:
        pinned = Path(private) / path.name
        try:
            shutil.copyfile(path, pinned)
        except OSError as exc:
            raise BackupError(f"{path.name} could not be copied to {private} for the restore: {exc}") from exc
        report = _verify(pinned, manifest, authenticated=authenticated, settings=settings)
        safety = run_backup(kind="safety", settings=settings)
        logger.info("safety backup %s taken before restoring %s", safety.file, path.name)
        backend.restore(pinned)
    restored = backend.count_rows()
    differences = {
        t: (n, restored.get(t, 0)) for t, n in report.manifest.tables.items() if restored.get(t, 0) != n
    }
    return RestoreReport(
        path=path,
        manifest=report.manifest,
        safety_backup=safety,
        restored_rows=restored,
        authenticated=authenticated,
        differences=differences,
    )


def cleanup_backups(*, settings: Settings | None = None) -> list[str]:
    """Apply retention (the newest BACKUP_KEEP_FULL / _SCHEMA / _SAFETY of each kind stay) and
    remove unfinished files a killed backup left behind. Returns the removed file names."""
    settings = settings or get_settings()
    keep = {
        "full": settings.backup_keep_full,
        "schema": settings.backup_keep_schema,
        "safety": settings.backup_keep_safety,
    }
    removed: list[str] = []
    for manifest in select_expired(list_backups(settings=settings), keep):
        for path in (
            settings.backup_dir / manifest.file,
            settings.backup_dir / manifest_name(manifest.file),
        ):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path.name)
    cutoff = time.time() - _STALE_PARTIAL.total_seconds()
    if settings.backup_dir.is_dir():
        for partial in settings.backup_dir.glob(f"{PREFIX}*{PARTIAL_SUFFIX}"):
            if partial.stat().st_mtime < cutoff:
                partial.unlink(missing_ok=True)
                removed.append(partial.name)
    if removed:
        logger.info("backup retention removed %d file(s)", len(removed))
    return removed


# -- the backup run ----------------------------------------------------------------------


def _run_backup(kind: BackupKind, settings: Settings) -> BackupManifest:
    backend = _backend(settings)
    directory = settings.backup_dir
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    created_at, final = free_name(directory, kind=kind, suffix=backend.suffix)
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    started = time.perf_counter()
    try:
        # Owner-only from the first byte: dumps hold key hashes and the prediction log.
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        tables, revision, tool = backend.dump(partial, schema_only=kind == "schema")
        partial.replace(final)
    finally:
        partial.unlink(missing_ok=True)
    manifest = BackupManifest(
        file=final.name,
        kind=kind,
        engine=backend.engine,
        database=backend.database,
        created_at=created_at,
        duration_seconds=round(time.perf_counter() - started, 3),
        size_bytes=final.stat().st_size,
        sha256=sha256_file(final),
        alembic_revision=revision,
        tables=tables,
        tool=tool,
    )
    key = backup_signing_key(settings)
    if key is not None:
        manifest = sign_manifest(manifest, key)
    write_atomically(directory / manifest_name(final.name), manifest.to_json())
    logger.info(
        "%s backup %s: %d bytes, %d tables, %.1f s, %s",
        kind,
        final.name,
        manifest.size_bytes,
        len(tables),
        manifest.duration_seconds,
        "signed" if key is not None else "unsigned (BACKUP_SIGNING_KEY is not set)",
    )
    return manifest


# -- database engines --------------------------------------------------------------------
# Imported when a backup, verify or restore needs one: importing ops.backup.catalogue (what
# /metrics reads at every scrape) runs this module, and must not load SQLAlchemy and Alembic.


def _backend(settings: Settings) -> Backend:
    from sqlalchemy.engine import make_url

    url = make_url(settings.effective_database_url)
    name = url.get_backend_name()
    if name == "postgresql":
        from ops.backup.postgres import PostgresBackend

        return PostgresBackend(url)
    if name == "sqlite":
        from ops.backup.sqlite import SqliteBackend

        return SqliteBackend(url)
    raise BackupError(f"DATABASE_URL: backups support PostgreSQL and SQLite, not {name}")


def _backend_for_manifest(manifest: BackupManifest, settings: Settings) -> Backend:
    if manifest.engine == "sqlite":
        from sqlalchemy.engine import make_url

        from ops.backup.sqlite import SqliteBackend

        # A SQLite backup restores into a scratch file; no server is involved.
        return SqliteBackend(make_url("sqlite://"))
    backend = _backend(settings)
    if backend.engine != "postgresql":
        raise BackupError(
            f"{manifest.file} is a PostgreSQL backup; verifying it needs DATABASE_URL to point "
            "at a PostgreSQL server (it restores into a scratch database there)"
        )
    return backend
