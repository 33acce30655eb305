"""``flood bento build|list`` and ``flood serve``: Bentos pinned to registry versions."""

from __future__ import annotations

import os
import shutil
import sys
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
    from bundle.bentos import build_bento
    from bundle.model_import import import_registry_version

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

    from bundle.bentos import list_bentos

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
    replace: bool = typer.Option(
        False,
        "--replace",
        help="Take over from the server already on HOST:PORT: it stops once this one is ready.",
    ),
    ready_timeout: float = typer.Option(
        180, "--ready-timeout", min=5, help="With --replace: give up (the old server stays) after this."
    ),
) -> None:
    """Serve a Bento; serving an older tag is how a deployment rolls back, and --replace
    does it without refusing a connection (serving.handover)."""
    from bundle.bentos import BentoError, bentoml_environ, find_bento, serve_argv
    from serving.handover import (
        HANDOVER_DIR_ENV,
        handover_dir,
        migration_enabled,
        prune_handover_dirs,
        serving_pid,
        start_detached,
    )

    settings = get_settings()
    bento = find_bento(tag, settings=settings)
    run_dir = settings.flood_home.resolve() / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    prune_handover_dirs(run_dir)
    pidfile = run_dir / f"serve-{host}-{port}.pid"
    old_pid = serving_pid(pidfile)
    if old_pid is not None and not replace:
        raise BentoError(
            f"pid {old_pid} already serves {host}:{port}; `flood serve --replace` hands over "
            "without an outage, or stop it first"
        )
    env = bentoml_environ(settings)
    ready_dir = handover_dir(run_dir, os.getpid())
    shutil.rmtree(ready_dir, ignore_errors=True)
    env[HANDOVER_DIR_ENV] = str(ready_dir)
    if old_pid is not None:
        if not migration_enabled():
            typer.secho(
                "net.ipv4.tcp_migrate_req is 0: connections queued at the old server when it "
                "closes may be reset; `sysctl -w net.ipv4.tcp_migrate_req=1` moves them over",
                err=True,
                fg="yellow",
            )
        workers = settings.serving_api_workers
        count = (os.cpu_count() or 1) if workers == "cpu_count" else int(workers)
        start_detached(
            [
                sys.executable,
                "-m",
                "serving.handover",
                "finish",
                str(old_pid),
                str(os.getpid()),
                str(ready_dir),
                str(handover_dir(run_dir, old_pid)),
                host,
                str(port),
                str(count),
                str(ready_timeout),
            ]
        )
        typer.echo(f"replacing pid {old_pid} once this server is ready", err=True)
    pinned = "the champion's Bento" if tag is None else "as asked"
    typer.echo(f"serving {bento.tag} (model {bento.model_tag}, {pinned}) on {host}:{port}", err=True)
    pidfile.write_text(f"{os.getpid()}\n")
    argv = serve_argv(bento, host=host, port=port)
    # Replace this process so SIGTERM from a supervisor reaches BentoML's arbiter directly
    # and in-flight requests drain (graceful shutdown) instead of being cut by a wrapper.
    os.execve(argv[0], argv, env)
