"""``flood db`` and ``flood keys`` end to end on the default SQLite database."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from core.errors import AuthenticationError
from core.settings import get_settings
from ops.keys import ApiKeyStore

KEY_RE = re.compile(r"^fnq_[0-9a-f]{12}_\S{43}$", re.MULTILINE)


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_db_upgrade_then_key_lifecycle() -> None:
    assert "revision 0003" in invoke("db", "upgrade")
    assert "database: 0003" in invoke("db", "current")

    created = invoke("keys", "create", "--name", "barangay-ops", "--tier", "basic")
    (raw_key,) = KEY_RE.findall(created)
    key_id = raw_key[:16]
    listing = invoke("keys", "list")
    assert key_id in listing and "barangay-ops" in listing and raw_key not in listing
    (row,) = [line.split() for line in listing.splitlines() if line.startswith(key_id)]
    assert row[1:3] == ["active", "current"]  # status, and the secret that verifies it

    rotated = invoke("keys", "rotate", key_id, "--grace-hours", "2")
    (new_key,) = KEY_RE.findall(rotated)
    store = ApiKeyStore(cache_seconds=0)
    assert store.verify_key(raw_key).rotated_to == new_key[:16]
    assert store.verify_key(new_key).tier == "basic"
    assert "rotating" in invoke("keys", "list")

    invoke("keys", "revoke", key_id)
    with pytest.raises(AuthenticationError):
        store.verify_key(raw_key)
    assert key_id not in invoke("keys", "list")
    assert key_id in invoke("keys", "list", "--all")


def test_key_errors_exit_non_zero() -> None:
    invoke("db", "upgrade")
    result = CliRunner().invoke(app, ["keys", "create", "--name", "x", "--tier", "gold"])
    assert result.exit_code != 0
    assert "unknown tier" in str(result.exception)


def test_keys_work_on_a_fresh_embedded_database() -> None:
    # `make run` creates its development key before any `flood db upgrade`.
    created = invoke("keys", "create", "--name", "local", "--tier", "pro")
    assert len(KEY_RE.findall(created)) == 1


def test_keys_refuse_a_database_behind_head(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLOOD_ENV", "production")
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["keys", "list"])
    assert result.exit_code != 0
    assert "flood db upgrade" in str(result.exception)
