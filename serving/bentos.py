"""Building, listing and serving Bentos, each pinned to one registry version.

BentoML keeps its stores under ``FLOOD_HOME/bentoml``; every ``bentoml`` subprocess gets
``BENTOML_HOME`` pointing there, and in-process reads open those stores by path, so
nothing here depends on BentoML's process-global configuration.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from core.errors import ConfigurationError, FloodError, ModelIntegrityError
from core.settings import Settings
from ops.signing import signing_key
from serving.model_store import import_model, sign_imported_model
from serving.predictor import ServedModel
from training.data import sha256_file

logger = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[1]
BENTO_NAME = "flood_risk"
GRACEFUL_SHUTDOWN_S = 30
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


def pinned_model_tag() -> str:
    """The model tag this Bento was built with (``--arg model_tag``); never ``latest``."""
    from bentoml import use_arguments

    tag = str(getattr(use_arguments(), "model_tag", "") or "")
    name, _, version = tag.partition(":")
    if not name or not version or version == "latest":
        raise ConfigurationError(
            f"model_tag {tag!r} does not pin a model version; build with `flood bento build` "
            "or pass --arg model_tag=<name>:<version>"
        )
    return tag


def bentoml_environ(settings: Settings) -> dict[str, str]:
    """The environment for ``bentoml`` subprocesses: stores under FLOOD_HOME, no telemetry."""
    env = dict(os.environ)
    env["BENTOML_HOME"] = str(settings.bentoml_home)
    env["BENTOML_DO_NOT_TRACK"] = "true"
    env["FLOOD_HOME"] = str(settings.flood_home.resolve())
    return env


def bentoml_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bentoml", *args]


def verify_run_id(model_dir: Path, run_id: str) -> None:
    """The downloaded model must come from the run the registry version names."""
    import yaml

    recorded = yaml.safe_load((model_dir / "MLmodel").read_text()).get("run_id")
    if not run_id or recorded != run_id:
        raise ModelIntegrityError(
            f"model files were logged by run {recorded!r}, the registry version names {run_id!r}"
        )


def import_registry_version(version: int | None, *, settings: Settings, workdir: Path) -> str:
    """Resolve (default: the champion), download, verify and import one registry version.

    ``download_model`` checks the files against the version's recorded sha256; the run id
    in the files must match the version's; the BentoML model tag records both. With
    MODEL_SIGNING_KEY set, the imported model is signed.
    """
    import registry

    info = registry.get_version(version) if version is not None else registry.resolve_alias()
    model_dir = registry.download_model(info.version, workdir / f"v{info.version}")
    verify_run_id(model_dir, info.run_id)
    pipeline_file = registry.pipeline_path(model_dir)
    served = ServedModel(
        name=info.name,
        version=info.version,
        bento_model_tag="",
        run_id=info.run_id,
        data_source=info.data_source,
        sha256=info.model_sha256,
        pipeline_sha256=sha256_file(pipeline_file),
        thresholds=info.thresholds,
        validation_status=info.validation_status,
        metrics=dict(info.metrics),
        created_at=info.created_at.isoformat(),
    )
    store_dir = settings.bentoml_home / "models"
    tag = import_model(served, pipeline_file, store_dir=store_dir)
    if settings.model_signing_key is not None:
        # Signed as stored, so the Bento carries the signature its service checks at start.
        sign_imported_model(tag, store_dir=store_dir, key=signing_key(settings))
    return tag


def build_bento(model_tag: str, *, settings: Settings) -> str:
    """``bentoml build`` pinned to a stored model; the new Bento's tag."""
    from serving.model_store import read_model

    served, _ = read_model(model_tag, store_dir=settings.bentoml_home / "models")
    command = bentoml_command(
        "build",
        str(PROJECT_DIR),
        "--output",
        "tag",
        "--arg",
        f"model_tag={model_tag}",
        "--label",
        f"flood_model_version={served.version}",
        "--label",
        f"flood_data_source={served.data_source}",
    )
    done = subprocess.run(command, env=bentoml_environ(settings), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BentoError(f"bentoml build failed: {done.stderr.strip()[-2000:]}")
    for line in done.stdout.splitlines():
        if line.startswith("__tag__:"):
            return line.removeprefix("__tag__:").strip()
    raise BentoError(f"bentoml build printed no tag: {done.stdout[-500:]}")


def list_bentos(settings: Settings) -> list[BentoSummary]:
    """Bentos in FLOOD_HOME, newest first, with the model each one pins."""
    from bentoml._internal.bento import BentoStore

    store_dir = settings.bentoml_home / "bentos"
    if not store_dir.is_dir():
        return []
    summaries = []
    for bento in BentoStore(str(store_dir)).list():
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
    """The Bento with this tag (``name:version`` or just version), or the newest one."""
    bentos = list_bentos(settings)
    if not bentos:
        raise BentoError("no Bentos built yet; run `flood bento build`")
    if tag is None:
        return bentos[0]
    for bento in bentos:
        if tag in (bento.tag, bento.tag.partition(":")[2]):
            return bento
    raise BentoError(f"no Bento {tag!r}; `flood bento list` shows the built ones")


def serve_argv(bento: BentoSummary, *, host: str, port: int) -> list[str]:
    # Serving the Bento's directory (not the tag) leaves no room for BentoML to resolve
    # the identifier as a module path or as another Bento.
    return bentoml_command(
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
    )
