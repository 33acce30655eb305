"""``flood config check``: what production would refuse, and how to fix it."""

from __future__ import annotations

import logging

import typer

from core.errors import FloodError
from core.settings import get_settings

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
    model: bool | None = typer.Option(
        None,
        "--model/--skip-model",
        help="Look up the champion's training data (default: in production only; MLflow loads slowly).",
    ),
) -> None:
    """Exit 1 if any problem applies to the current FLOOD_ENV; list them all either way."""
    from ops.configcheck import find_config_problems  # SQLAlchemy: not for `flood --help`

    settings = get_settings()
    check_model = settings.is_production if model is None else model
    data_source = _champion_data_source() if check_model else None
    if not check_model:
        typer.echo("champion model not checked (--model checks it)", err=True)
    problems = find_config_problems(settings, model_data_source=data_source)
    refused = [problem for problem in problems if problem.applies(settings)]
    for problem in problems:
        label = "REFUSED" if problem.applies(settings) else "production would refuse"
        typer.echo(f"[{label}] {problem}")
    if refused:
        typer.secho(f"{len(refused)} problem(s) refused in {settings.flood_env}", err=True, fg="red")
        raise typer.Exit(1)
    typer.echo(f"configuration ok for {settings.flood_env}")
