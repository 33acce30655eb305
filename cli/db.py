"""``flood db ...``: the ops database schema (API keys, prediction log)."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True)


@app.command("upgrade")
def upgrade_command(
    revision: str = typer.Option("head", "--revision", help="Target Alembic revision."),
) -> None:
    """Create or migrate the ops tables at DATABASE_URL (default: SQLite under FLOOD_HOME)."""
    from ops.migrations import current_revision, upgrade_database  # Alembic: not for --help

    upgrade_database(revision=revision)
    typer.echo(f"ops schema at revision {current_revision()}")


@app.command("current")
def current_command() -> None:
    """Show the schema revision in the database and the newest one this code knows."""
    from ops.migrations import current_revision, head_revision

    typer.echo(f"database: {current_revision() or 'empty'}   code: {head_revision()}")


@app.command("replay-rejected")
def replay_rejected_command() -> None:
    """Insert again the prediction-log rows the database refused for good (FLOOD_HOME/journal/
    rejected-*.jsonl), once their cause is fixed; rows that still fail are kept."""
    from ops.predictionlog import replay_rejected

    result = replay_rejected()
    typer.echo(
        f"{result.files} rejects files: {result.replayed} rows inserted, "
        f"{result.still_rejected} still rejected"
    )
    if result.still_rejected:
        raise typer.Exit(1)
