"""The ``flood`` command: one entry point, one sub-app per concern."""

from __future__ import annotations

import importlib.util
import logging
import sys

import typer

from cli import backup, config, db, keys
from core.errors import FloodError

# The Bento image ships the operations commands (keys, db, config, backup) and neither
# training/, bundle/ nor MLflow (bentofile.yaml); the commands that need those exist only
# where they are installed, instead of failing on an import at first use.
BUILD_PACKAGES = ("training", "bundle", "mlflow")
HAS_BUILD_PACKAGES = all(importlib.util.find_spec(name) is not None for name in BUILD_PACKAGES)

app = typer.Typer(help="Floodingnaque: flood-risk models for Parañaque City.", no_args_is_help=True)
if HAS_BUILD_PACKAGES:
    from cli import bento, mlflow, models, train

    app.command("train")(train.train_command)
    app.add_typer(models.app, name="models", help="Model versions in the MLflow registry.")
    app.add_typer(bento.app, name="bento", help="Bentos pinned to registry versions.")
    app.command("serve")(bento.serve_command)
app.add_typer(keys.app, name="keys", help="API keys: create, list, revoke, rotate.")
app.add_typer(db.app, name="db", help="Ops database schema (API keys, prediction log).")
app.add_typer(config.app, name="config", help="Configuration checks.")
app.add_typer(backup.app, name="backup", help="Backups of the ops database: run, list, verify, restore.")
if HAS_BUILD_PACKAGES:
    app.add_typer(mlflow.app, name="mlflow", help="MLflow's UI on this project's store.")


@app.callback()
def configure(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Alembic announces each of its plugins at INFO on every command that touches the schema.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def run() -> None:
    """Console entry point: domain errors become one clear line and exit code 1.

    Standalone mode lets Click turn usage errors, ``typer.Exit(n)`` and aborts into their
    messages and exit codes; it re-raises everything else, so domain errors land here.
    """
    try:
        app()
    except FloodError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise SystemExit(1) from None


if __name__ == "__main__":  # `python -m cli.main`: the CLI of this source tree, not the installed one
    run()
