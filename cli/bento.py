"""``flood bento build|list`` and ``flood serve``: Bentos pinned to registry versions."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import typer

from core.settings import get_settings

app = typer.Typer(no_args_is_help=True)


@app.command("build")
def build_command(
    version: int | None = typer.Option(
        None, "--version", help="Registry version to pin (default: the champion)."
    ),
) -> None:
    """Import a registry version into the BentoML store and build a Bento pinned to it."""
    typer.echo(build_version_bento(version))


def build_version_bento(version: int | None) -> str:
    """Import ``version`` (default: the champion) and build a Bento pinned to it; its tag."""
    from serving.bentos import build_bento, import_registry_version

    settings = get_settings()
    with tempfile.TemporaryDirectory(prefix="flood-bento-") as tmp:
        model_tag = import_registry_version(version, settings=settings, workdir=Path(tmp))
    typer.echo(f"model {model_tag}", err=True)
    return build_bento(model_tag, settings=settings)


@app.command("list")
def list_command() -> None:
    """Bentos in FLOOD_HOME, newest first, with the registry version each one serves."""
    from rich.console import Console
    from rich.table import Table

    from serving.bentos import list_bentos

    table = Table("bento", "model version", "model tag", "created")
    table.columns[0].no_wrap = table.columns[2].no_wrap = True
    for bento in list_bentos(get_settings()):
        table.add_row(
            bento.tag,
            str(bento.model_version or "?"),
            bento.model_tag,
            bento.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    Console().print(table)


def serve_command(
    tag: str | None = typer.Argument(
        None, help="Bento tag (default: the newest Bento built for the current champion)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    port: int = typer.Option(3000, "--port", help="Port to listen on."),
) -> None:
    """Serve a Bento; serving an older tag is how a deployment rolls back."""
    from serving.bentos import bentoml_environ, find_bento, serve_argv

    settings = get_settings()
    bento = find_bento(tag, settings=settings)
    pinned = "the champion's Bento" if tag is None else "as asked"
    typer.echo(f"serving {bento.tag} (model {bento.model_tag}, {pinned}) on {host}:{port}", err=True)
    argv = serve_argv(bento, host=host, port=port)
    # Replace this process so SIGTERM from a supervisor reaches BentoML's arbiter directly
    # and in-flight requests drain (graceful shutdown) instead of being cut by a wrapper.
    os.execve(argv[0], argv, bentoml_environ(settings))
