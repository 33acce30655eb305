"""``flood backup ...``: backups of the ops database (the same functions the Celery tasks call).

Each command imports ``ops.backup`` itself: SQLAlchemy, Alembic and prometheus_client are
not worth loading for ``flood --help``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True)


@app.command("run")
def run_command(
    schema_only: bool = typer.Option(False, "--schema-only", help="Tables and indexes, no rows."),
) -> None:
    """Back up DATABASE_URL into FLOOD_HOME/backups, with a manifest beside the file."""
    from ops import backup

    manifest = backup.run_backup(kind="schema" if schema_only else "full")
    rows = ", ".join(f"{table}={count}" for table, count in sorted(manifest.tables.items()))
    typer.echo(
        f"{manifest.file}  {_size(manifest.size_bytes)}  {manifest.duration_seconds:.1f} s  "
        f"revision {manifest.alembic_revision or '-'}  rows: {rows or 'no tables'}"
    )


@app.command("list")
def list_command() -> None:
    """Backups with a manifest, newest first."""
    from ops import backup

    backups = backup.list_backups()
    summary = backup.backup_summary()
    if summary.last_failure_at is not None:
        typer.secho(
            f"{summary.failures_total} failed attempt(s); last {_when(summary.last_failure_at)}: "
            f"{summary.last_error}",
            err=True,
            fg=typer.colors.YELLOW,
        )
    if not backups:
        typer.echo("no backups")
        return
    width = max(len(m.file) for m in backups)
    # Plain lines: the file name (UTC time in it) is what `verify` and `restore` take.
    for manifest in backups:
        typer.echo(
            f"{manifest.file:{width}}  {manifest.kind:6}  {_size(manifest.size_bytes):>10}  "
            f"{sum(manifest.tables.values()):>9} rows  revision {manifest.alembic_revision or '-'}"
        )


@app.command("verify")
def verify_command(
    file: str | None = typer.Argument(
        None, help="Backup file or name in the backup folder (default: newest)."
    ),
) -> None:
    """Check the manifest's signature and the sha256, then restore into a scratch database,
    comparing row counts."""
    from ops import backup

    report = backup.verify_backup(backup.resolve_backup(file))
    _warn_unauthenticated(report.authenticated)
    typer.echo(
        f"ok: {report.path.name} ({'signature valid, ' if report.authenticated else ''}sha256 matches, "
        f"{len(report.restored_rows)} tables, {sum(report.restored_rows.values())} rows restored as recorded)"
    )


@app.command("restore")
def restore_command(
    file: str = typer.Argument(..., help="Backup file or name in the backup folder."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Verify FILE, back up the current state, then replace the database's contents with FILE."""
    from ops import backup

    path = backup.resolve_backup(file)
    if not yes:
        typer.confirm(
            f"Replace the contents of the ops database with {Path(path).name}? "
            "(a safety backup is taken first)",
            abort=True,
        )
    report = backup.restore_backup(path)
    _warn_unauthenticated(report.authenticated)
    typer.echo(f"safety backup: {report.safety_backup.file}")
    typer.echo(f"restored {report.path.name} (taken {_when(report.manifest.created_at)})")
    for table, (expected, actual) in sorted(report.differences.items()):
        typer.secho(
            f"warning: {table} has {actual} rows, the backup {expected} (written to meanwhile?)",
            err=True,
            fg=typer.colors.YELLOW,
        )


@app.command("cleanup")
def cleanup_command() -> None:
    """Keep the newest BACKUP_KEEP_FULL full, BACKUP_KEEP_SCHEMA schema-only and
    BACKUP_KEEP_SAFETY safety backups; delete the rest."""
    from ops import backup

    removed = backup.cleanup_backups()
    typer.echo(f"removed {len(removed)} file(s)" + "".join(f"\n  {name}" for name in removed))


@app.command("schedule")
def schedule_command() -> None:
    """When the Celery beat schedule next runs each periodic task (Asia/Manila)."""
    from ops.tasks import describe_schedule  # Celery is only needed here

    for line in describe_schedule():
        typer.echo(line)


def _warn_unauthenticated(authenticated: bool) -> None:
    if not authenticated:
        typer.secho(
            "warning: manifest not authenticated (BACKUP_SIGNING_KEY is not set), so a forged "
            "backup would pass as well; set the key to sign and check backups",
            err=True,
            fg=typer.colors.YELLOW,
        )


def _size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
