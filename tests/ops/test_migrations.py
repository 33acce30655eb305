"""The Alembic revision creates exactly the schema the SQLAlchemy models describe."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from core.settings import Settings
from ops.database import get_engine
from ops.migrations import VERSION_TABLE, current_revision, head_revision, upgrade_database
from ops.tables import Base


def schema_drift(url: str) -> list[object]:
    with get_engine(url).connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return list(compare_metadata(context, Base.metadata))


def test_sqlite_upgrade_is_idempotent_and_matches_models(settings: Settings) -> None:
    assert current_revision() is None
    upgrade_database()
    upgrade_database()
    assert current_revision() == head_revision() is not None
    assert schema_drift(settings.effective_database_url) == []


@pytest.mark.postgres
def test_postgres_schema_matches_models(postgres_url: str) -> None:
    assert current_revision(postgres_url) == head_revision()
    assert schema_drift(postgres_url) == []


@pytest.mark.postgres
def test_version_table_does_not_collide_with_mlflow(postgres_url: str) -> None:
    from sqlalchemy import inspect

    names = inspect(get_engine(postgres_url)).get_table_names()
    assert VERSION_TABLE in names and "alembic_version" not in names


def test_a_missing_database_is_named_as_the_cause(postgres_url: str, settings: Settings) -> None:
    from sqlalchemy.engine import make_url

    from core.errors import DependencyUnavailableError
    from ops.migrations import prepare_database

    missing = make_url(postgres_url).set(database="flood_no_such_database")
    configured = settings.model_copy(update={"database_url": missing.render_as_string(hide_password=False)})
    with pytest.raises(DependencyUnavailableError, match='database "flood_no_such_database" does not exist'):
        prepare_database(configured)


def test_a_database_newer_than_the_code_is_refused_clearly(settings: Settings) -> None:
    """A rollback to a Bento built before the last migration met Alembic's traceback."""
    from sqlalchemy import text

    from core.errors import ConfigurationError
    from ops.migrations import prepare_database

    upgrade_database(settings.effective_database_url)
    with get_engine(settings.effective_database_url).begin() as connection:
        connection.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    with pytest.raises(ConfigurationError, match="revision 9999, newer than this code knows"):
        prepare_database(settings)
