"""What the PostgreSQL and SQLite engines share: the interface the backup run calls, and
the tables a schema-only backup keeps."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ops.backup.catalogue import EngineName
from ops.migrations import VERSION_TABLE

# Tables whose rows are the schema's identity: a schema-only backup keeps them so a restored
# database knows its migration revision (ours, and MLflow's when it shares the database).
VERSION_TABLES = frozenset({VERSION_TABLE, "alembic_version"})


class Backend(Protocol):
    engine: EngineName
    database: str
    suffix: str

    def dump(self, dest: Path, *, schema_only: bool) -> tuple[dict[str, int], str | None, str]: ...

    def restore_scratch(self, path: Path) -> dict[str, int]: ...

    def restore(self, path: Path) -> None: ...

    def count_rows(self) -> dict[str, int]: ...


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
