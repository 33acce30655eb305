"""Alembic environment: the engine comes from ``ops.migrations.alembic_config``."""

from __future__ import annotations

from alembic import context

from ops.migrations import VERSION_TABLE
from ops.tables import Base

config = context.config
engine = config.attributes["engine"]

with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
