"""Backups of the ops database: the one implementation behind ``flood backup`` and the Celery tasks.

PostgreSQL is dumped with ``pg_dump`` (custom format) inside an exported snapshot, so the row
counts in the manifest are exactly the rows in the file even while the service keeps writing
the prediction log. SQLite is copied with the online backup API. Every backup file has a
manifest beside it (``flood_<UTC time>_<kind>.manifest.json``): kind, tables with row counts,
sha256, size, duration and the Alembic revision. The manifest is written last, so a file
without one is an unfinished or foreign file and is never trusted.

``verify`` checks the sha256 and restores into a scratch database, comparing row counts with
the manifest; ``restore`` refuses what fails verify and takes a safety backup first. Failures
are counted in ``state.json`` beside the backups; :class:`BackupMetricsCollector` turns the
catalogue and that file into Prometheus gauges.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from core.checksum import sha256_file
from core.errors import BackupError
from core.settings import Settings, get_settings
from ops.migrations import VERSION_TABLE

logger = logging.getLogger(__name__)

BackupKind = Literal["full", "schema", "safety"]
KINDS: tuple[BackupKind, ...] = ("full", "schema", "safety")
MANIFEST_SUFFIX = ".manifest.json"
STATE_FILE = "state.json"
_PREFIX = "flood_"
_PARTIAL_SUFFIX = ".partial"
_TIME_FORMAT = "%Y%m%dT%H%M%SZ"
_FORMAT_VERSION = 1
# Tables whose rows are the schema's identity: a schema-only backup keeps them so a restored
# database knows its migration revision (ours, and MLflow's when it shares the database).
_VERSION_TABLES = frozenset({VERSION_TABLE, "alembic_version"})
# Restoring waits this long for locks (e.g. a long query on the prediction log), then fails
# clearly instead of hanging behind it.
_RESTORE_LOCK_TIMEOUT = "60s"
_STALE_PARTIAL = timedelta(days=1)


@dataclass(frozen=True)
class BackupManifest:
    file: str
    kind: BackupKind
    engine: Literal["postgresql", "sqlite"]
    database: str
    created_at: datetime
    duration_seconds: float
    size_bytes: int
    sha256: str
    alembic_revision: str | None
    # Rows each table holds *in the file* (zero for data-less tables of a schema backup).
    tables: dict[str, int]
    tool: str
    format_version: int = _FORMAT_VERSION

    def to_json(self) -> str:
        data = asdict(self)
        data["created_at"] = self.created_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> BackupManifest:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            data["created_at"] = datetime.fromisoformat(data["created_at"])
            manifest = cls(**data)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise BackupError(f"manifest {path} is unreadable: {exc}") from exc
        if manifest.kind not in KINDS or manifest.engine not in ("postgresql", "sqlite"):
            raise BackupError(
                f"manifest {path} has unknown kind or engine ({manifest.kind}, {manifest.engine})"
            )
        # A manifest names its dump beside it, and only that: cleanup deletes what it names,
        # so "../../victim.txt" (or another manifest's dump) must never get that far.
        if (
            not isinstance(manifest.file, str)
            or Path(manifest.file).name != manifest.file
            or not manifest.file.startswith(_PREFIX)
            or _manifest_name(manifest.file) != path.name
        ):
            raise BackupError(f"manifest {path} names {manifest.file!r}, which is not its own backup file")
        return manifest


@dataclass(frozen=True)
class VerifyReport:
    path: Path
    manifest: BackupManifest
    restored_rows: dict[str, int]


@dataclass(frozen=True)
class RestoreReport:
    path: Path
    manifest: BackupManifest
    safety_backup: BackupManifest
    restored_rows: dict[str, int]
    # Tables whose count differs from the manifest right after the restore: only possible
    # when something wrote to the database meanwhile.
    differences: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class BackupSummary:
    counts: dict[str, int]
    latest: dict[str, BackupManifest]
    failures_total: int
    last_failure_at: datetime | None
    last_error: str | None


# -- public API --------------------------------------------------------------------------


def run_backup(*, kind: BackupKind = "full", settings: Settings | None = None) -> BackupManifest:
    """Back up the database at settings.effective_database_url into settings.backup_dir."""
    settings = settings or get_settings()
    if kind not in KINDS:
        raise BackupError(f"unknown backup kind {kind!r}; expected one of {', '.join(KINDS)}")
    try:
        return _run_backup(kind, settings)
    except BackupError as exc:
        _record_failure(settings.backup_dir, kind=kind, error=str(exc))
        raise
    except OSError as exc:  # disk full, permissions: the operator's to fix, not a bug
        _record_failure(settings.backup_dir, kind=kind, error=str(exc))
        raise BackupError(f"{kind} backup could not be written: {exc}") from exc
    except Exception as exc:
        # Anything else is a bug: counted for the alert, raised with its traceback.
        _record_failure(settings.backup_dir, kind=kind, error=f"{type(exc).__name__}: {exc}")
        raise


def list_backups(*, settings: Settings | None = None) -> list[BackupManifest]:
    """Every backup with a readable manifest, newest first."""
    return _read_catalogue((settings or get_settings()).backup_dir)


def resolve_backup(name: str | Path | None = None, *, settings: Settings | None = None) -> Path:
    """The backup file meant by ``name``: a path, a file name in backup_dir, a manifest, or
    (None) the newest backup."""
    settings = settings or get_settings()
    if name is None:
        backups = list_backups(settings=settings)
        if not backups:
            raise BackupError(f"no backups in {settings.backup_dir}")
        return settings.backup_dir / backups[0].file
    candidate = Path(name).expanduser()
    if not candidate.exists() and not candidate.is_absolute():
        candidate = settings.backup_dir / candidate
    if candidate.name.endswith(MANIFEST_SUFFIX) and candidate.is_file():
        candidate = candidate.with_name(BackupManifest.from_file(candidate).file)
    if not candidate.is_file():
        raise BackupError(f"no backup file {name} (looked in {settings.backup_dir} too)")
    return candidate.resolve()


def verify_backup(path: Path, *, settings: Settings | None = None) -> VerifyReport:
    """Check the file's sha256, restore it into a scratch database and compare row counts.

    Raises :class:`BackupError` with the reason when anything does not match.
    """
    settings = settings or get_settings()
    manifest = _manifest_for(path)
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
    logger.info("verified %s: %d tables, sha256 ok", path.name, len(restored))
    return VerifyReport(path=path, manifest=manifest, restored_rows=restored)


def restore_backup(path: Path, *, settings: Settings | None = None) -> RestoreReport:
    """Replace the database's contents with ``path`` after verifying it and backing up the
    current state. Asking for confirmation is the caller's job."""
    settings = settings or get_settings()
    backend = _backend(settings)
    manifest = _manifest_for(path)
    if backend.engine != manifest.engine:
        raise BackupError(f"{path.name} is a {manifest.engine} backup but DATABASE_URL is {backend.engine}")
    report = verify_backup(path, settings=settings)
    safety = run_backup(kind="safety", settings=settings)
    logger.info("safety backup %s taken before restoring %s", safety.file, path.name)
    backend.restore(path)
    restored = backend.count_rows()
    differences = {
        t: (n, restored.get(t, 0)) for t, n in report.manifest.tables.items() if restored.get(t, 0) != n
    }
    return RestoreReport(
        path=path,
        manifest=report.manifest,
        safety_backup=safety,
        restored_rows=restored,
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
            settings.backup_dir / _manifest_name(manifest.file),
        ):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path.name)
    cutoff = time.time() - _STALE_PARTIAL.total_seconds()
    if settings.backup_dir.is_dir():
        for partial in settings.backup_dir.glob(f"{_PREFIX}*{_PARTIAL_SUFFIX}"):
            if partial.stat().st_mtime < cutoff:
                partial.unlink(missing_ok=True)
                removed.append(partial.name)
    if removed:
        logger.info("backup retention removed %d file(s)", len(removed))
    return removed


def select_expired(manifests: list[BackupManifest], keep: Mapping[str, int]) -> list[BackupManifest]:
    """The backups beyond the newest ``keep[kind]`` of their kind."""
    expired: list[BackupManifest] = []
    for kind in KINDS:
        of_kind = sorted(
            (m for m in manifests if m.kind == kind), key=lambda m: (m.created_at, m.file), reverse=True
        )
        expired.extend(of_kind[keep[kind] :])
    return expired


def backup_summary(*, backup_dir: Path | None = None) -> BackupSummary:
    """What monitoring needs: backups per kind, the newest of each, failures so far."""
    directory = backup_dir or get_settings().backup_dir
    manifests = _read_catalogue(directory)
    latest: dict[str, BackupManifest] = {}
    counts: dict[str, int] = dict.fromkeys(KINDS, 0)
    for manifest in manifests:
        counts[manifest.kind] += 1
        latest.setdefault(manifest.kind, manifest)
    state = _read_state(directory)
    last_failure = state.get("last_failure_at")
    return BackupSummary(
        counts=counts,
        latest=latest,
        failures_total=int(state.get("failures_total", 0)),
        last_failure_at=datetime.fromisoformat(last_failure) if last_failure else None,
        last_error=state.get("last_error"),
    )


class BackupMetricsCollector(Collector):
    """Prometheus gauges read from the backup catalogue at scrape time.

    Register it on the registry that serves ``/metrics``; it reads a directory of small JSON
    files, so a scrape costs a few milliseconds and never touches the database.
    """

    def __init__(self, backup_dir: Path | None = None) -> None:
        self._backup_dir = backup_dir

    def collect(self) -> Iterator[Metric]:
        try:
            summary = backup_summary(backup_dir=self._backup_dir)
        except Exception:
            # A scrape must not fail because the backups volume is missing or unreadable;
            # the absent last-success gauge is what the alert fires on.
            logger.exception("cannot read the backup catalogue")
            return
        success = GaugeMetricFamily(
            "flood_backup_last_success_timestamp_seconds",
            "Unix time the newest backup of each kind started",
            labels=["kind"],
        )
        size = GaugeMetricFamily(
            "flood_backup_last_size_bytes", "Size of the newest backup of each kind", labels=["kind"]
        )
        duration = GaugeMetricFamily(
            "flood_backup_last_duration_seconds",
            "How long the newest backup of each kind took",
            labels=["kind"],
        )
        for kind, manifest in sorted(summary.latest.items()):
            success.add_metric([kind], manifest.created_at.timestamp())
            size.add_metric([kind], manifest.size_bytes)
            duration.add_metric([kind], manifest.duration_seconds)
        files = GaugeMetricFamily("flood_backup_files", "Backups kept, by kind", labels=["kind"])
        for kind, count in sorted(summary.counts.items()):
            files.add_metric([kind], count)
        failures = CounterMetricFamily(
            "flood_backup_failures", "Backup attempts that failed", value=summary.failures_total
        )
        yield from (success, size, duration, files, failures)
        if summary.last_failure_at is not None:
            yield GaugeMetricFamily(
                "flood_backup_last_failure_timestamp_seconds",
                "Unix time of the last failed backup attempt",
                value=summary.last_failure_at.timestamp(),
            )


# -- the backup run ----------------------------------------------------------------------


def _run_backup(kind: BackupKind, settings: Settings) -> BackupManifest:
    backend = _backend(settings)
    directory = settings.backup_dir
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    created_at, final = _free_name(directory, kind=kind, suffix=backend.suffix)
    partial = final.with_name(final.name + _PARTIAL_SUFFIX)
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
    _write_atomically(directory / _manifest_name(final.name), manifest.to_json())
    logger.info(
        "%s backup %s: %d bytes, %d tables, %.1f s",
        kind,
        final.name,
        manifest.size_bytes,
        len(tables),
        manifest.duration_seconds,
    )
    return manifest


def _free_name(directory: Path, *, kind: str, suffix: str) -> tuple[datetime, Path]:
    # Names carry the start time to the second; a second backup of the same kind within that
    # second waits for the next one rather than inventing a time.
    while True:
        now = datetime.now(UTC).replace(microsecond=0)
        path = directory / f"{_PREFIX}{now.strftime(_TIME_FORMAT)}_{kind}{suffix}"
        if not path.exists() and not (directory / _manifest_name(path.name)).exists():
            return now, path
        time.sleep(1.0 - datetime.now(UTC).microsecond / 1e6)


def _manifest_name(file_name: str) -> str:
    return Path(file_name).stem + MANIFEST_SUFFIX


def _manifest_paths(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(directory.glob(f"{_PREFIX}*{MANIFEST_SUFFIX}"))


def _read_catalogue(directory: Path) -> list[BackupManifest]:
    manifests = []
    for path in _manifest_paths(directory):
        try:
            manifests.append(BackupManifest.from_file(path))
        except BackupError as exc:
            logger.warning("skipping %s", exc)
    return sorted(manifests, key=lambda m: (m.created_at, m.file), reverse=True)


def _manifest_for(path: Path) -> BackupManifest:
    if not path.is_file():
        raise BackupError(f"backup file {path} does not exist")
    manifest_path = path.with_name(_manifest_name(path.name))
    if not manifest_path.is_file():
        raise BackupError(f"{path.name} has no manifest ({manifest_path.name}); it cannot be verified")
    manifest = BackupManifest.from_file(manifest_path)
    if manifest.file != path.name:
        raise BackupError(f"{manifest_path.name} describes {manifest.file}, not {path.name}")
    return manifest


def _write_atomically(path: Path, content: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with os.fdopen(
        os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8"
    ) as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


# -- failure state (for metrics) ---------------------------------------------------------


def _read_state(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("backup state file unreadable (%s); counting from zero", exc)
        return {}
    return data if isinstance(data, dict) else {}


def _record_failure(directory: Path, *, kind: str, error: str) -> None:
    logger.error("%s backup failed: %s", kind, error)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # The CLI and the worker may fail at the same moment; the lock keeps the count right.
        with (directory / (STATE_FILE + ".lock")).open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = _read_state(directory)
            state["failures_total"] = int(state.get("failures_total", 0)) + 1
            state["last_failure_at"] = datetime.now(UTC).isoformat()
            state["last_failure_kind"] = kind
            state["last_error"] = error[:2000]
            _write_atomically(directory / STATE_FILE, json.dumps(state, indent=2) + "\n")
    except OSError:
        logger.exception("cannot record the backup failure in %s", directory)


# -- database engines --------------------------------------------------------------------


class _Backend(Protocol):
    engine: Literal["postgresql", "sqlite"]
    database: str
    suffix: str

    def dump(self, dest: Path, *, schema_only: bool) -> tuple[dict[str, int], str | None, str]: ...

    def restore_scratch(self, path: Path) -> dict[str, int]: ...

    def restore(self, path: Path) -> None: ...

    def count_rows(self) -> dict[str, int]: ...


def _backend(settings: Settings) -> _Backend:
    url = make_url(settings.effective_database_url)
    name = url.get_backend_name()
    if name == "postgresql":
        return _PostgresBackend(url)
    if name == "sqlite":
        return _SqliteBackend(url)
    raise BackupError(f"DATABASE_URL: backups support PostgreSQL and SQLite, not {name}")


def _backend_for_manifest(manifest: BackupManifest, settings: Settings) -> _Backend:
    if manifest.engine == "sqlite":
        # A SQLite backup restores into a scratch file; no server is involved.
        return _SqliteBackend(make_url("sqlite://"))
    backend = _backend(settings)
    if backend.engine != "postgresql":
        raise BackupError(
            f"{manifest.file} is a PostgreSQL backup; verifying it needs DATABASE_URL to point "
            "at a PostgreSQL server (it restores into a scratch database there)"
        )
    return backend


class _PostgresBackend:
    engine: Literal["postgresql", "sqlite"] = "postgresql"
    suffix = ".dump"

    def __init__(self, url: URL) -> None:
        self._url = url
        self.database = url.database or ""

    def dump(self, dest: Path, *, schema_only: bool) -> tuple[dict[str, int], str | None, str]:
        tool = _tool_version("pg_dump")
        engine = create_engine(self._url, poolclass=NullPool, isolation_level="REPEATABLE READ")
        try:
            with engine.connect() as conn, conn.begin():
                # pg_dump joins this transaction's snapshot, so the counts below are exactly
                # the rows it writes, whatever the service inserts meanwhile.
                snapshot = conn.execute(text("SELECT pg_export_snapshot()")).scalar_one()
                tables = _pg_tables(conn)
                counts = {_pg_key(s, t): _count(conn, s, t) for s, t in tables}
                revision = _read_revision(conn, counts)
                args = ["--format=custom", f"--snapshot={snapshot}", f"--file={dest}"]
                if schema_only:
                    for schema, table in tables:
                        if table not in _VERSION_TABLES:
                            args.append(f"--exclude-table-data={_pg_pattern(schema, table)}")
                            counts[_pg_key(schema, table)] = 0
                self._run("pg_dump", [*args, self._conninfo(self.database)])
        except SQLAlchemyError as exc:
            raise BackupError(f"cannot read database {self.database!r}: {_reason(exc)}") from exc
        finally:
            engine.dispose()
        return counts, revision, tool

    def restore_scratch(self, path: Path) -> dict[str, int]:
        _tool_version("pg_restore")
        scratch = f"flood_verify_{secrets.token_hex(6)}"
        admin = create_engine(self._url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{scratch}"'))
        except SQLAlchemyError as exc:
            admin.dispose()
            raise BackupError(f"cannot create scratch database {scratch}: {_reason(exc)}") from exc
        try:
            self._run(
                "pg_restore",
                ["--no-owner", "--no-privileges", "--exit-on-error", "--dbname", self._conninfo(scratch)],
                path,
            )
            return _PostgresBackend(self._url.set(database=scratch)).count_rows()
        finally:
            try:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)'))
            except SQLAlchemyError:
                logger.exception("could not drop scratch database %s", scratch)
            admin.dispose()

    def restore(self, path: Path) -> None:
        self._run(
            "pg_restore",
            [
                "--clean",
                "--if-exists",
                "--no-owner",
                "--no-privileges",
                "--single-transaction",
                "--exit-on-error",
                "--dbname",
                self._conninfo(self.database),
            ],
            path,
        )

    def count_rows(self) -> dict[str, int]:
        engine = create_engine(self._url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                return {_pg_key(s, t): _count(conn, s, t) for s, t in _pg_tables(conn)}
        except SQLAlchemyError as exc:
            raise BackupError(f"cannot count rows in {self._url.database!r}: {_reason(exc)}") from exc
        finally:
            engine.dispose()

    def _conninfo(self, database: str) -> str:
        # libpq reads the password from the environment, so it never shows in `ps`.
        url = self._url.set(drivername="postgresql", password=None, database=database)
        return url.render_as_string(hide_password=False)

    def _run(self, tool: str, args: list[str], input_file: Path | None = None) -> None:
        env = dict(os.environ)
        if self._url.password is not None:
            env["PGPASSWORD"] = str(self._url.password)
        env["PGOPTIONS"] = f"-c lock_timeout={_RESTORE_LOCK_TIMEOUT}"
        command = [tool, *args] + ([str(input_file)] if input_file else [])
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            detail = result.stderr.strip() or f"exit code {result.returncode}"
            raise BackupError(f"{tool} failed: {detail}")


class _SqliteBackend:
    engine: Literal["postgresql", "sqlite"] = "sqlite"
    suffix = ".sqlite3"

    def __init__(self, url: URL) -> None:
        self._path = Path(url.database) if url.database and url.database != ":memory:" else None
        self.database = self._path.name if self._path else ""

    def dump(self, dest: Path, *, schema_only: bool) -> tuple[dict[str, int], str | None, str]:
        source = self._require_path()
        if not source.is_file():
            raise BackupError(f"SQLite database {source} does not exist (run `flood db upgrade`)")
        with _sqlite(source, readonly=True) as src, _sqlite(dest) as dst:
            src.backup(dst)
            # The copy inherits WAL mode; a backup file must be one self-contained file.
            dst.execute("PRAGMA journal_mode=DELETE")
            if schema_only:
                for table in _sqlite_tables(dst):
                    if table not in _VERSION_TABLES:
                        dst.execute(f"DELETE FROM {_quote(table)}")
                if dst.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").fetchone():
                    dst.execute("DELETE FROM sqlite_sequence")
                dst.commit()
                dst.execute("VACUUM")
            counts = _sqlite_counts(dst)
            revision = _sqlite_revision(dst)
        return counts, revision, f"sqlite3 {sqlite3.sqlite_version}"

    def restore_scratch(self, path: Path) -> dict[str, int]:
        with tempfile.TemporaryDirectory(prefix="flood-verify-") as tmp:
            scratch = Path(tmp) / "scratch.sqlite3"
            try:
                with _sqlite(path, readonly=True) as src, _sqlite(scratch) as dst:
                    src.backup(dst)
                    check = dst.execute("PRAGMA integrity_check").fetchone()
                    if not check or check[0] != "ok":
                        raise BackupError(f"{path.name} fails SQLite's integrity check: {check}")
                    return _sqlite_counts(dst)
            except sqlite3.DatabaseError as exc:
                raise BackupError(f"{path.name} is not a readable SQLite database: {exc}") from exc

    def restore(self, path: Path) -> None:
        target = self._require_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with _sqlite(path, readonly=True) as src, _sqlite(target) as dst:
                dst.execute("PRAGMA busy_timeout=30000")
                src.backup(dst)
        except sqlite3.Error as exc:
            raise BackupError(f"restoring into {target} failed: {exc}") from exc

    def count_rows(self) -> dict[str, int]:
        with _sqlite(self._require_path(), readonly=True) as conn:
            return _sqlite_counts(conn)

    def _require_path(self) -> Path:
        if self._path is None:
            raise BackupError("DATABASE_URL points at an in-memory SQLite database; nothing to back up")
        return self._path


# -- helpers -----------------------------------------------------------------------------


def _tool_version(tool: str) -> str:
    if shutil.which(tool) is None:
        raise BackupError(f"{tool} is not on PATH; install the PostgreSQL client matching the server")
    result = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False)
    return result.stdout.strip()


def _reason(exc: SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig or exc).strip().splitlines()[0]


def _pg_tables(conn: Connection) -> list[tuple[str, str]]:
    rows = conn.execute(
        text(
            "SELECT n.nspname, c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') AND n.nspname !~ '^pg_' "
            "AND n.nspname <> 'information_schema' ORDER BY 1, 2"
        )
    )
    return [(str(schema), str(table)) for schema, table in rows]


def _pg_key(schema: str, table: str) -> str:
    return table if schema == "public" else f"{schema}.{table}"


def _pg_pattern(schema: str, table: str) -> str:
    # pg_dump patterns treat double-quoted names literally (no wildcards, case kept).
    return f"{_quote(schema)}.{_quote(table)}"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _count(conn: Connection, schema: str, table: str) -> int:
    return int(conn.execute(text(f"SELECT count(*) FROM {_pg_pattern(schema, table)}")).scalar_one())


def _read_revision(conn: Connection, counts: dict[str, int]) -> str | None:
    if not counts.get(VERSION_TABLE):
        return None
    rows = conn.execute(text(f"SELECT version_num FROM {_quote(VERSION_TABLE)} ORDER BY 1")).scalars()
    return ",".join(rows) or None


@contextlib.contextmanager
def _sqlite(path: Path, *, readonly: bool = False) -> Iterator[sqlite3.Connection]:
    uri = path.resolve().as_uri() + ("?mode=ro" if readonly else "")
    conn = sqlite3.connect(uri, uri=True)
    try:
        yield conn
    finally:
        conn.close()


def _sqlite_tables(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
    )
    return [str(name) for (name,) in rows]


def _sqlite_counts(conn: sqlite3.Connection) -> dict[str, int]:
    return {
        table: int(conn.execute(f"SELECT count(*) FROM {_quote(table)}").fetchone()[0])
        for table in _sqlite_tables(conn)
    }


def _sqlite_revision(conn: sqlite3.Connection) -> str | None:
    if VERSION_TABLE not in _sqlite_tables(conn):
        return None
    rows = conn.execute(f"SELECT version_num FROM {_quote(VERSION_TABLE)} ORDER BY 1").fetchall()
    return ",".join(str(r[0]) for r in rows) or None
