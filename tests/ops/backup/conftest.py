"""Backup fixtures: an upgraded SQLite ops database (FLOOD_HOME's default) with real rows."""

from __future__ import annotations

import pytest

from core.settings import Settings
from ops.migrations import upgrade_database
from tests.ops.backup.support import insert_rows


@pytest.fixture
def sqlite_url(settings: Settings) -> str:
    url = settings.effective_database_url
    upgrade_database(url)
    insert_rows(url, keys=12, predictions=250)
    return url
