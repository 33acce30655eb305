"""PostgreSQL backups: ``pg_dump`` (custom format) inside an exported snapshot, so the row
counts in the manifest are exactly the rows in the file even while the service keeps writing
the prediction log; verify restores into a scratch database on the same server."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
from pathlib import Path

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from core.errors import BackupError
from ops.backup.catalogue import EngineName
from ops.backup.engine import VERSION_TABLES, quote_identifier
from ops.migrations import VERSION_TABLE

logger = logging.getLogger(__name__)

# Restoring waits this long for locks (e.g. a long query on the prediction log), then fails
# clearly instead of hanging behind it.
_RESTORE_LOCK_TIMEOUT = "60s"


class PostgresBackend:
    engine: EngineName = "postgresql"
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
                        if table not in VERSION_TABLES:
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
            return PostgresBackend(self._url.set(database=scratch)).count_rows()
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
    return f"{quote_identifier(schema)}.{quote_identifier(table)}"


def _count(conn: Connection, schema: str, table: str) -> int:
    return int(conn.execute(text(f"SELECT count(*) FROM {_pg_pattern(schema, table)}")).scalar_one())


def _read_revision(conn: Connection, counts: dict[str, int]) -> str | None:
    if not counts.get(VERSION_TABLE):
        return None
    rows = conn.execute(
        text(f"SELECT version_num FROM {quote_identifier(VERSION_TABLE)} ORDER BY 1")
    ).scalars()
    return ",".join(rows) or None
