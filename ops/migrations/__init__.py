"""Alembic migrations for the ops schema, configured in code so ``flood db upgrade`` works
from any directory without an alembic.ini."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

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


def head_revision() -> str | None:
    config = Config()
    config.set_main_option("script_location", str(_HERE))
    return ScriptDirectory.from_config(config).get_current_head()
