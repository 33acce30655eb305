"""Engines for the ops database (API keys, prediction log), one per URL per process.

SQLite is the embedded default; PostgreSQL when DATABASE_URL says so. Engines are cached so
the request path never pays for connection setup, and disposable so tests and forked
workers can start clean.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from core.settings import get_settings

_engines: dict[str, Engine] = {}
_lock = threading.Lock()

# A down PostgreSQL must fail fast: the prediction log falls back to its journal and the
# key check to its cache rather than hanging a request for the OS default (minutes).
_PG_CONNECT_TIMEOUT_S = 3


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets service workers write the log while the CLI manages keys; busy_timeout waits
    # for a competing writer instead of failing with "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def create_database_engine(
    url: str, *, pool_size: int | None = None, statement_timeout_ms: int | None = None
) -> Engine:
    """A new engine for ``url``; prefer :func:`get_engine`, which caches.

    ``statement_timeout_ms`` bounds each PostgreSQL statement (server side). TCP keepalives
    find a vanished database host within ~15 s instead of the kernel's two hours.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, pool_pre_ping=True)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    size = pool_size if pool_size is not None else get_settings().db_pool_size
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql":
        connect_args["connect_timeout"] = _PG_CONNECT_TIMEOUT_S
        connect_args.update(keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3)
        if statement_timeout_ms is not None:
            connect_args["options"] = f"-c statement_timeout={statement_timeout_ms}"
    return create_engine(
        url,
        pool_size=size,
        max_overflow=size,
        pool_pre_ping=True,
        connect_args=connect_args,
    )


def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for ``url`` (default: settings.effective_database_url)."""
    url = url or get_settings().effective_database_url
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = create_database_engine(url)
            _engines[url] = engine
        return engine


def get_session_factory(url: str | None = None) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


def dispose_engines() -> None:
    """Close every cached engine's pool (tests, forked workers, shutdown)."""
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.dispose()


@contextlib.contextmanager
def scratch_postgres_database(admin_url: str, *, prefix: str) -> Iterator[str]:
    """URL of a new, empty database on ``admin_url``'s server, dropped afterwards even with
    connections still open (MLflow and cached engines keep pools for a process's life)."""
    url = make_url(admin_url)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield url.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
