"""``flood config check``: what production would refuse, and how to fix it."""

from __future__ import annotations

import logging

import typer

from core.errors import FloodError
from core.settings import get_settings
from ops.configcheck import find_config_problems

app = typer.Typer(no_args_is_help=True)
logger = logging.getLogger(__name__)


def _champion_data_source() -> str | None:
    # Imported here: the registry pulls in MLflow, which a config check without a model
    # (--skip-model) should not pay for.
    from registry.versions import resolve_alias

    try:
        return resolve_alias().data_source
    except FloodError as exc:
        logger.warning("champion model not checked: %s", exc)
        return None


@app.command("check")
def check_command(
    skip_model: bool = typer.Option(
        False, "--skip-model", help="Do not look up the champion's training data."
    ),
) -> None:
    """Exit 1 if any problem applies to the current FLOOD_ENV; list them all either way."""
    settings = get_settings()
    data_source = None if skip_model else _champion_data_source()
    problems = find_config_problems(settings, model_data_source=data_source)
    refused = [problem for problem in problems if problem.applies(settings)]
    for problem in problems:
        label = "REFUSED" if problem.applies(settings) else "production would refuse"
        typer.echo(f"[{label}] {problem}")
    if refused:
        typer.secho(f"{len(refused)} problem(s) refused in {settings.flood_env}", err=True, fg="red")
        raise typer.Exit(1)
    typer.echo(f"configuration ok for {settings.flood_env}")
