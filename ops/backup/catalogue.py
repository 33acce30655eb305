"""The backup catalogue: the manifests beside the backup files and the failure state file.

Every backup file has a manifest beside it (``flood_<UTC time>_<kind>.manifest.json``): kind,
tables with row counts, sha256, size, duration, the Alembic revision and, with
BACKUP_SIGNING_KEY, an HMAC over all of these (:mod:`ops.backup.signature`). The manifest is
written last, so a file without one is an unfinished or foreign file and is never trusted.
Failures are counted in ``state.json`` beside the backups.

This module reads and writes small JSON files only (no database, no SQLAlchemy): the
``/metrics`` collector in :mod:`serving.metrics` reads it at every scrape.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from core.errors import BackupError
from core.settings import Settings, get_settings

logger = logging.getLogger(__name__)

BackupKind = Literal["full", "schema", "safety"]
EngineName = Literal["postgresql", "sqlite"]
KINDS: tuple[BackupKind, ...] = ("full", "schema", "safety")
MANIFEST_SUFFIX = ".manifest.json"
STATE_FILE = "state.json"
PREFIX = "flood_"
PARTIAL_SUFFIX = ".partial"
_TIME_FORMAT = "%Y%m%dT%H%M%SZ"
# 2 added ``signature``; format 1 manifests still read, as unsigned ones.
_FORMAT_VERSION = 2


@dataclass(frozen=True)
class BackupManifest:
    file: str
    kind: BackupKind
    engine: EngineName
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
    # HMAC-SHA256 over every other field (ops.backup.signature); None: made without a key.
    signature: str | None = None

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
            or not manifest.file.startswith(PREFIX)
            or manifest_name(manifest.file) != path.name
        ):
            raise BackupError(f"manifest {path} names {manifest.file!r}, which is not its own backup file")
        # JSON could hold any type here; hmac.compare_digest must only ever see a str.
        if manifest.signature is not None and not isinstance(manifest.signature, str):
            raise BackupError(f"manifest {path} has a signature that is not a string")
        return manifest


@dataclass(frozen=True)
class BackupSummary:
    counts: dict[str, int]
    latest: dict[str, BackupManifest]
    failures_total: int
    last_failure_at: datetime | None
    last_error: str | None


def list_backups(*, settings: Settings | None = None) -> list[BackupManifest]:
    """Every backup with a readable manifest, newest first."""
    return read_catalogue((settings or get_settings()).backup_dir)


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
    manifests = read_catalogue(directory)
    latest: dict[str, BackupManifest] = {}
    counts: dict[str, int] = dict.fromkeys(KINDS, 0)
    for manifest in manifests:
        counts[manifest.kind] += 1
        latest.setdefault(manifest.kind, manifest)
    state = read_state(directory)
    last_failure = state.get("last_failure_at")
    return BackupSummary(
        counts=counts,
        latest=latest,
        failures_total=int(state.get("failures_total", 0)),
        last_failure_at=datetime.fromisoformat(last_failure) if last_failure else None,
        last_error=state.get("last_error"),
    )


# -- manifests ---------------------------------------------------------------------------


def free_name(directory: Path, *, kind: str, suffix: str) -> tuple[datetime, Path]:
    # Names carry the start time to the second; a second backup of the same kind within that
    # second waits for the next one rather than inventing a time.
    while True:
        now = datetime.now(UTC).replace(microsecond=0)
        path = directory / f"{PREFIX}{now.strftime(_TIME_FORMAT)}_{kind}{suffix}"
        if not path.exists() and not (directory / manifest_name(path.name)).exists():
            return now, path
        time.sleep(1.0 - datetime.now(UTC).microsecond / 1e6)


def manifest_name(file_name: str) -> str:
    return Path(file_name).stem + MANIFEST_SUFFIX


def _manifest_paths(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(directory.glob(f"{PREFIX}*{MANIFEST_SUFFIX}"))


def read_catalogue(directory: Path) -> list[BackupManifest]:
    manifests = []
    for path in _manifest_paths(directory):
        try:
            manifests.append(BackupManifest.from_file(path))
        except BackupError as exc:
            logger.warning("skipping %s", exc)
    return sorted(manifests, key=lambda m: (m.created_at, m.file), reverse=True)


def manifest_for(path: Path) -> BackupManifest:
    if not path.is_file():
        raise BackupError(f"backup file {path} does not exist")
    manifest_path = path.with_name(manifest_name(path.name))
    if not manifest_path.is_file():
        raise BackupError(f"{path.name} has no manifest ({manifest_path.name}); it cannot be verified")
    manifest = BackupManifest.from_file(manifest_path)
    if manifest.file != path.name:
        raise BackupError(f"{manifest_path.name} describes {manifest.file}, not {path.name}")
    return manifest


def write_atomically(path: Path, content: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with os.fdopen(
        os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8"
    ) as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


# -- failure state (for metrics) ---------------------------------------------------------


def read_state(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("backup state file unreadable (%s); counting from zero", exc)
        return {}
    return data if isinstance(data, dict) else {}


def record_failure(directory: Path, *, kind: str, error: str) -> None:
    logger.error("%s backup failed: %s", kind, error)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # The CLI and the worker may fail at the same moment; the lock keeps the count right.
        with (directory / (STATE_FILE + ".lock")).open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = read_state(directory)
            state["failures_total"] = int(state.get("failures_total", 0)) + 1
            state["last_failure_at"] = datetime.now(UTC).isoformat()
            state["last_failure_kind"] = kind
            state["last_error"] = error[:2000]
            write_atomically(directory / STATE_FILE, json.dumps(state, indent=2) + "\n")
    except OSError:
        logger.exception("cannot record the backup failure in %s", directory)
