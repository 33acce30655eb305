"""Building, listing and serving Bentos, each pinned to one registry version.

BentoML keeps its stores under ``FLOOD_HOME/bentoml``; every ``bentoml`` subprocess gets
``BENTOML_HOME`` pointing there, and in-process reads open those stores by path, so
nothing here depends on BentoML's process-global configuration.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from core.errors import FloodError
from core.settings import Settings
from serving import bentoml_internals
from serving.model_store import read_model
from serving.shutdown import GRACEFUL_SHUTDOWN_S

logger = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[1]
BENTOFILE = "bentofile.yaml"
BENTO_NAME = "flood_risk"
# Idle keep-alive connections are closed after this. It must outlast the idle timeout of
# whatever keeps connections open to us (httpx 5 s, nginx and cloud load balancers 60 s):
# closing first races the client's next request on that connection (measured in the soak:
# one ReadError in 36 008 requests with uvicorn's 5 s).
KEEP_ALIVE_S = 75


class BentoError(FloodError):
    """A Bento could not be built, found or served."""


@dataclass(frozen=True)
class BentoSummary:
    tag: str
    created_at: datetime
    model_tag: str
    model_version: int | None
    path: Path


def bentoml_environ(settings: Settings) -> dict[str, str]:
    """The environment for ``bentoml`` subprocesses: stores under FLOOD_HOME, no telemetry."""
    env = dict(os.environ)
    env["BENTOML_HOME"] = str(settings.bentoml_home)
    env["BENTOML_DO_NOT_TRACK"] = "true"
    env["FLOOD_HOME"] = str(settings.flood_home.resolve())
    return env


def bentoml_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bentoml", *args]


def stage_build_context(project_dir: Path, dest: Path) -> Path:
    """A build context holding only what ``bentofile.yaml`` names: its includes' top-level
    entries and the Docker setup script, never the checkout's state (``.flood``, venvs).

    BentoML walks the whole build context, so building from the checkout itself would copy
    whatever FLOOD_HOME or BENTOML_HOME holds there, earlier Bentos included, into each new
    Bento; paths nest until the OS refuses them (the second build in a checkout failed).
    """
    import yaml

    config = yaml.safe_load((project_dir / BENTOFILE).read_text())
    tops = {pattern.lstrip("/").split("/", 1)[0] for pattern in config.get("include") or []}
    setup_script = (config.get("docker") or {}).get("setup_script")
    if setup_script:
        tops.add(setup_script)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(project_dir / BENTOFILE, dest / BENTOFILE)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in sorted(tops):
        if any(char in name for char in "*?["):
            raise BentoError(f"{BENTOFILE}: include {name!r} must start with a literal top-level path")
        source = project_dir / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=ignore, symlinks=True)
        elif source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
        else:
            raise BentoError(f"{BENTOFILE} names {name!r}, which is not in {project_dir}")
    return dest


_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+(?:Error|Exception)|Error|error)\b[^:]*:\s*\S")


def first_error_line(output: str) -> str:
    """The first line of a failed command's output that names an error, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if _ERROR_LINE.match(line):
            return line[:500]
    return lines[-1][:500] if lines else "(no output)"


def build_bento(model_tag: str, *, settings: Settings) -> str:
    """``bentoml build`` pinned to a stored model, from a clean staged context; the new tag.

    On failure the whole output is kept under ``FLOOD_HOME/logs`` and the error names it.
    """
    served, _ = read_model(model_tag, store_dir=settings.bentoml_home / "models")
    with tempfile.TemporaryDirectory(prefix="flood-bento-src-") as tmp:
        context = stage_build_context(PROJECT_DIR, Path(tmp) / "src")
        command = bentoml_command(
            "build",
            str(context),
            "--output",
            "tag",
            "--arg",
            f"model_tag={model_tag}",
            "--label",
            f"flood_model_version={served.version}",
            "--label",
            f"flood_data_source={served.data_source}",
        )
        done = subprocess.run(
            command,
            cwd=context,  # BentoML refuses a bentofile outside its working directory
            env=bentoml_environ(settings),
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode != 0:
        log_dir = settings.flood_home.resolve() / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_file = log_dir / f"bento-build-{datetime.now().strftime('%Y%m%dT%H%M%S')}.log"
        log_file.write_text(f"$ {' '.join(command)}\n{done.stdout}\n{done.stderr}")
        reason = first_error_line(done.stderr) if done.stderr.strip() else first_error_line(done.stdout)
        raise BentoError(f"bentoml build failed: {reason} (full output in {log_file})")
    for line in done.stdout.splitlines():
        if line.startswith("__tag__:"):
            return line.removeprefix("__tag__:").strip()
    raise BentoError(f"bentoml build printed no tag: {done.stdout[-500:]}")


def list_bentos(settings: Settings) -> list[BentoSummary]:
    """Bentos in FLOOD_HOME, newest first, with the model each one pins."""
    store_dir = settings.bentoml_home / "bentos"
    if not store_dir.is_dir():
        return []
    summaries = []
    for bento in bentoml_internals.bento_store(str(store_dir)).list():
        info = bento.info
        model_tag = str(info.args.get("model_tag", ""))
        version = info.labels.get("flood_model_version")
        summaries.append(
            BentoSummary(
                tag=str(bento.tag),
                created_at=info.creation_time,
                model_tag=model_tag,
                model_version=int(version) if version else None,
                path=Path(bento.path),
            )
        )
    return sorted(summaries, key=lambda b: b.created_at, reverse=True)


def find_bento(tag: str | None, *, settings: Settings) -> BentoSummary:
    """The Bento with this tag (``name:version`` or just version); with no tag, the newest
    Bento built for the current champion (``champion_bento``)."""
    if tag is None:
        return champion_bento(settings)
    for bento in list_bentos(settings):
        if tag in (bento.tag, bento.tag.partition(":")[2]):
            return bento
    raise BentoError(f"no Bento {tag!r}; `flood bento list` shows the built ones")


def champion_bento(settings: Settings) -> BentoSummary:
    """The newest Bento pinned to the registry's champion version.

    Not simply the newest Bento: after ``flood models rollback`` the newest one serves the
    version just rolled away from.
    """
    import registry

    champion = registry.resolve_alias()
    for bento in list_bentos(settings):
        if bento.model_version == champion.version:
            return bento
    raise BentoError(
        f"no Bento is built for the champion v{champion.version}; "
        f"build one with `flood bento build --version {champion.version}`"
    )


def serve_argv(bento: BentoSummary, *, host: str, port: int) -> list[str]:
    # Serving the Bento's directory (not the tag) leaves no room for BentoML to resolve
    # the identifier as a module path or as another Bento. BentoML runs through
    # serving.handover, which lets a replacement take the port without refusing anyone.
    return [
        sys.executable,
        "-m",
        "serving.handover",
        "serve",
        str(bento.path),
        "--host",
        host,
        "--port",
        str(port),
        "--timeout-graceful-shutdown",
        str(GRACEFUL_SHUTDOWN_S),
        "--timeout-keep-alive",
        str(KEEP_ALIVE_S),
    ]
