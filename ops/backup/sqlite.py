"""SQLite backups: the online backup API copies the database file while the service keeps
using it; verify copies the backup into a scratch file and runs SQLite's integrity check."""

from __future__ import annotations

import contextlib
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy.engine import URL

from core.errors import BackupError
from ops.backup.catalogue import EngineName
from ops.backup.engine import VERSION_TABLES, quote_identifier
from ops.migrations import VERSION_TABLE


class SqliteBackend:
    engine: EngineName = "sqlite"
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
                    if table not in VERSION_TABLES:
                        dst.execute(f"DELETE FROM {quote_identifier(table)}")
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
        table: int(conn.execute(f"SELECT count(*) FROM {quote_identifier(table)}").fetchone()[0])
        for table in _sqlite_tables(conn)
    }


def _sqlite_revision(conn: sqlite3.Connection) -> str | None:
    if VERSION_TABLE not in _sqlite_tables(conn):
        return None
    rows = conn.execute(f"SELECT version_num FROM {quote_identifier(VERSION_TABLE)} ORDER BY 1").fetchall()
    return ",".join(str(r[0]) for r in rows) or None
