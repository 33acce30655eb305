"""``flood mlflow ui``: MLflow's own UI on this project's tracking store and registry."""

from __future__ import annotations

import os

import typer

app = typer.Typer(no_args_is_help=True)


@app.command("ui")
def ui_command(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    port: int = typer.Option(5000, "--port", help="Port to listen on."),
) -> None:
    """Runs, candidates (child runs), figures and registered versions, in the browser."""
    from registry.backend import display_uri, ui_argv

    argv = ui_argv(host=host, port=port)
    typer.echo(
        f"MLflow UI for {display_uri(argv[argv.index('--backend-store-uri') + 1])} on http://{host}:{port}",
        err=True,
    )
    os.execv(argv[0], argv)
