"""``flood keys ...``: issue, list, revoke and rotate API keys."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import typer

from core.settings import get_settings

if TYPE_CHECKING:
    from ops.keys import ApiKeyInfo, ApiKeyStore

app = typer.Typer(no_args_is_help=True)


@app.callback()
def require_schema() -> None:
    """Keys live in the ops database: the embedded SQLite is migrated on first use, any
    other database must be at head (the same rule as the service's start)."""
    from ops.migrations import prepare_database  # SQLAlchemy and Alembic: not for --help

    prepare_database(get_settings())


def _store() -> ApiKeyStore:
    from ops.keys import ApiKeyStore

    return ApiKeyStore()


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "-"


def _echo_issued(raw_key: str, info: ApiKeyInfo) -> None:
    typer.echo(f"id:   {info.key_id}")
    typer.echo(f"name: {info.name}   tier: {info.tier}   expires: {_when(info.expires_at)}")
    typer.echo("key (shown once; only its hash is stored):")
    typer.echo(raw_key)


@app.command("create")
def create_command(
    name: str = typer.Option(..., "--name", help="Who the key is for."),
    tier: str = typer.Option("free", "--tier", help="Rate-limit tier (RATE_LIMIT_TIERS)."),
    expires_days: float | None = typer.Option(
        None, "--expires-days", min=0, help="Expire after this many days (default: never)."
    ),
) -> None:
    """Create a key and print it once."""
    expires_at = datetime.now(UTC) + timedelta(days=expires_days) if expires_days else None
    issued = _store().create_key(name, tier, expires_at=expires_at)
    _echo_issued(issued.raw_key, issued.info)


@app.command("list")
def list_command(
    show_all: bool = typer.Option(False, "--all", help="Include revoked and expired keys."),
) -> None:
    """Keys with their status; never the keys themselves."""
    # Plain columns, name last: readable in a narrow terminal and easy to grep or cut.
    store = _store()
    keys = store.list_keys(include_inactive=show_all)
    # SECRET: which configured secret verifies the key; "none" means it can no longer work.
    row = "{:<17} {:<9} {:<10} {:<10} {:<20} {:<20} {:<17} {}"
    typer.echo(row.format("ID", "STATUS", "SECRET", "TIER", "CREATED", "EXPIRES", "ROTATED TO", "NAME"))
    now = datetime.now(UTC)
    unverifiable = 0
    for info in keys:
        label = store.secret_label(info)
        unverifiable += label == "none" and info.status(now) in ("active", "rotating")
        typer.echo(
            row.format(
                info.key_id,
                info.status(now),
                label,
                info.tier,
                _when(info.created_at),
                _when(info.expires_at),
                info.rotated_to or "-",
                info.name,
            )
        )
    if unverifiable:
        typer.secho(
            f"{unverifiable} active key(s) were hashed under a secret that is no longer configured: "
            "they are refused; put that secret in SECRET_KEY_PREVIOUS or issue new keys",
            err=True,
            fg="yellow",
        )


@app.command("revoke")
def revoke_command(key_id: str = typer.Argument(..., help="Key id from `flood keys list`.")) -> None:
    """Revoke a key; services stop accepting it within API_KEY_CACHE_SECONDS."""
    info = _store().revoke_key(key_id)
    typer.echo(f"revoked {info.key_id} ({info.name}) at {_when(info.revoked_at)}")


@app.command("rotate")
def rotate_command(
    key_id: str = typer.Argument(..., help="Key id from `flood keys list`."),
    grace_hours: float | None = typer.Option(
        None,
        "--grace-hours",
        min=0,
        help="How long the old key keeps working (default: API_KEY_GRACE_HOURS).",
    ),
) -> None:
    """Issue a successor; old and new both work until the grace period ends."""
    issued = _store().rotate_key(key_id, grace_hours=grace_hours)
    _echo_issued(issued.raw_key, issued.info)
    typer.echo(f"old key {key_id} stays valid for the grace period, then expires", err=True)
