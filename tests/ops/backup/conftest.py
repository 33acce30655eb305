"""Backup fixtures: an upgraded SQLite ops database (FLOOD_HOME's default) with real rows, and
BACKUP_SIGNING_KEY unset unless a test asks for ``backup_key``."""

from __future__ import annotations

import secrets

import pytest

from core.settings import Settings
from ops.migrations import upgrade_database
from tests.ops.backup.support import insert_rows, use_backup_key


@pytest.fixture(autouse=True)
def _no_backup_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # A BACKUP_SIGNING_KEY in the developer's shell must not decide which tests sign.
    use_backup_key(monkeypatch, None)


@pytest.fixture
def backup_key(monkeypatch: pytest.MonkeyPatch) -> str:
    """BACKUP_SIGNING_KEY set to a fresh strong key: backups are signed and checked."""
    key = secrets.token_urlsafe(48)
    use_backup_key(monkeypatch, key)
    return key


@pytest.fixture
def sqlite_url(settings: Settings) -> str:
    url = settings.effective_database_url
    upgrade_database(url)
    insert_rows(url, keys=12, predictions=250)
    return url
