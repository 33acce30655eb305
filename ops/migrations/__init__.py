"""Alembic migrations for the ops schema, configured in code so ``flood db upgrade`` works
from any directory without an alembic.ini."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from core.errors import ConfigurationError, DependencyUnavailableError
from core.settings import Settings
from ops.database import get_engine

# MLflow keeps its own ``alembic_version`` table; a distinct name lets both share one
# PostgreSQL database without fighting over it.
VERSION_TABLE = "flood_alembic_version"
_HERE = Path(__file__).resolve().parent


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_HERE))
    # Passed as an attribute, not an ini option: configparser would choke on '%' in passwords.
    config.attributes["engine"] = get_engine(url)
    return config


def upgrade_database(url: str | None = None, *, revision: str = "head") -> None:
    """Bring the ops schema at ``url`` (default: settings) up to ``revision``."""
    command.upgrade(alembic_config(url), revision)


def current_revision(url: str | None = None) -> str | None:
    with get_engine(url).connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def _scripts() -> ScriptDirectory:
    config = Config()
    config.set_main_option("script_location", str(_HERE))
    return ScriptDirectory.from_config(config)


def head_revision() -> str | None:
    return _scripts().get_current_head()


def prepare_database(settings: Settings) -> None:
    """The embedded development SQLite is migrated here, so ``make run`` needs no step;
    any other database must already be at the newest revision (``flood db upgrade``), since
    a service should not migrate a database it shares with other replicas."""
    url = settings.effective_database_url
    if make_url(url).get_backend_name() == "sqlite" and not settings.is_production:
        with _migration_lock(settings):
            _refuse_newer_schema(current_revision(url))
            upgrade_database(url)
        return
    try:
        current = current_revision(url)
    except SQLAlchemyError as exc:
        # The driver's first line names the cause (no such database, refused, bad password);
        # it never holds the password itself.
        cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:300]
        raise DependencyUnavailableError(
            f"cannot read the ops database schema at DATABASE_URL: {cause} "
            f"({exc.__class__.__name__}); is the database up, reachable and created?"
        ) from None
    _refuse_newer_schema(current)
    head = head_revision()
    if current != head:
        raise ConfigurationError(
            f"the ops database schema is at revision {current or '(empty)'}, this code needs {head}; "
            "run `flood db upgrade` against DATABASE_URL, then start the service again"
        )


def _refuse_newer_schema(current: str | None) -> None:
    """A schema this code has no migration for: a rollback to a Bento built before the
    database's last migration. Said plainly, instead of Alembic's "Can't locate revision"."""
    if current is None or current in {script.revision for script in _scripts().walk_revisions()}:
        return
    raise ConfigurationError(
        f"the ops database is at revision {current}, newer than this code knows (its newest is "
        f"{head_revision()}); serve a Bento built from code that has that revision, or restore "
        "a backup taken at an older one"
    )


@contextlib.contextmanager
def _migration_lock(settings: Settings) -> Iterator[None]:
    """Serialises migrations of one FLOOD_HOME across processes started at the same time."""
    path = settings.flood_home.resolve() / "migrate.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
