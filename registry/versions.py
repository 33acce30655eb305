"""Reading registered versions of the flood model: metadata, comparison, verified files."""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sklearn.pipeline import Pipeline

from core.errors import ModelIntegrityError, RegistryError
from core.risk import Thresholds
from core.settings import CHAMPION_ALIAS, get_settings
from registry.backend import connect, import_mlflow, is_not_found
from registry.integrity import load_pipeline_file, pipeline_path, sha256_tree

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

logger = logging.getLogger(__name__)

# Tags copied from the training run onto each registered version.
TAG_RUN_ID = "run_id"
TAG_MODEL_ID = "model_id"
TAG_DATA_SOURCE = "data_source"
TAG_CANDIDATE = "candidate"  # the model family that won selection (training.model)
TAG_MODEL_SHA256 = "model_sha256"
TAG_VALIDATION_STATUS = "validation_status"
TAG_VALIDATION_REASON = "validation_reason"
TAG_PROMOTED_AT = "promoted_at"


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: int
    run_id: str
    data_source: str  # "real" | "synthetic"
    model_sha256: str
    thresholds: Thresholds
    validation_status: str  # "passed" | "failed"
    metrics: dict[str, float]
    aliases: list[str]
    created_at: datetime  # UTC
    source: str  # MLflow model URI, "models:/m-..."
    validation_reason: str = ""
    promoted_at: datetime | None = None  # last time it became champion
    candidate: str = ""  # model family; empty for versions registered before candidates

    @property
    def is_champion(self) -> bool:
        return CHAMPION_ALIAS in self.aliases

    @property
    def is_synthetic(self) -> bool:
        return self.data_source != "real"


@dataclass(frozen=True)
class MetricComparison:
    metric: str
    a: float | None
    b: float | None

    @property
    def delta(self) -> float | None:
        """``b - a`` when both are known."""
        if self.a is None or self.b is None:
            return None
        return self.b - self.a


def model_name() -> str:
    return get_settings().flood_model_name


def fetch_model_version(client: MlflowClient, version: int) -> ModelVersion:
    name = model_name()
    try:
        return client.get_model_version(name, str(version))
    except Exception as exc:
        if is_not_found(exc):
            raise RegistryError(f"model {name!r} has no version {version}") from None
        raise


def version_info(client: MlflowClient, mv: ModelVersion) -> ModelVersionInfo:
    tags: dict[str, str] = dict(mv.tags or {})
    run_id = tags.get(TAG_RUN_ID) or mv.run_id or ""
    metrics: dict[str, float] = {}
    if run_id:
        try:
            metrics = dict(client.get_run(run_id).data.metrics)
        except Exception as exc:
            if not is_not_found(exc):
                raise
            logger.warning("run %s of %s v%s is gone; no metrics", run_id, mv.name, mv.version)
    try:
        thresholds = Thresholds.from_tags(tags)
    except (KeyError, ValueError):
        thresholds = Thresholds(alert=math.nan, critical=math.nan, rule="missing")
    promoted = tags.get(TAG_PROMOTED_AT)
    return ModelVersionInfo(
        name=mv.name,
        version=int(mv.version),
        run_id=run_id,
        data_source=tags.get(TAG_DATA_SOURCE, "unknown"),
        model_sha256=tags.get(TAG_MODEL_SHA256, ""),
        thresholds=thresholds,
        validation_status=tags.get(TAG_VALIDATION_STATUS, "unknown"),
        metrics=metrics,
        aliases=sorted(mv.aliases or []),
        created_at=datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=UTC),
        source=str(mv.source),
        validation_reason=tags.get(TAG_VALIDATION_REASON, ""),
        candidate=tags.get(TAG_CANDIDATE, ""),
        promoted_at=datetime.fromisoformat(promoted) if promoted else None,
    )


def list_versions() -> list[ModelVersionInfo]:
    """Every registered version, oldest first; empty before the first registration."""
    client = connect()
    name = model_name()
    found = client.search_model_versions(f"name = '{name}'")
    # Search results may omit aliases on some stores; the per-version read has them.
    versions = [fetch_model_version(client, int(mv.version)) for mv in found]
    return sorted((version_info(client, mv) for mv in versions), key=lambda v: v.version)


def get_version(version: int) -> ModelVersionInfo:
    client = connect()
    return version_info(client, fetch_model_version(client, version))


def alias_version(client: MlflowClient, alias: str) -> int | None:
    """The version number an alias points at, or None (also when nothing is registered)."""
    try:
        registered = client.get_registered_model(model_name())
    except Exception as exc:
        if is_not_found(exc):
            return None
        raise
    version = (registered.aliases or {}).get(alias)
    return None if version is None else int(version)


def resolve_alias(alias: str = CHAMPION_ALIAS) -> ModelVersionInfo:
    """The version an alias points at; ``RegistryError`` when it is not set yet."""
    client = connect()
    version = alias_version(client, alias)
    if version is None:
        hint = " (promote one with `flood models promote V`)" if alias == CHAMPION_ALIAS else ""
        raise RegistryError(f"model {model_name()!r} has no {alias!r} version yet{hint}")
    return version_info(client, fetch_model_version(client, version))


@dataclass(frozen=True)
class CandidateStanding:
    """One candidate of a training run, read from its child run."""

    name: str
    winner: bool
    eligible: bool
    note: str
    metrics: dict[str, float]


def candidate_standings(version: int) -> list[CandidateStanding]:
    """The candidates the training run of ``version`` compared, best pooled PR-AUC first."""
    client = connect()
    info = version_info(client, fetch_model_version(client, version))
    if not info.run_id:
        raise RegistryError(f"{info.name} v{version} names no training run")
    parent = client.get_run(info.run_id)
    children = client.search_runs(
        experiment_ids=[parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{info.run_id}'",
    )
    standings = [
        CandidateStanding(
            name=run.data.tags.get(TAG_CANDIDATE, run.info.run_name or "?"),
            winner=run.data.tags.get("winner") == "true",
            eligible=run.data.tags.get("eligible") == "true",
            note=run.data.tags.get("note", ""),
            metrics=dict(run.data.metrics),
        )
        for run in children
    ]
    return sorted(standings, key=lambda s: -s.metrics.get("pr_auc", -1.0))


def compare_versions(a: int, b: int) -> list[MetricComparison]:
    """Run metrics of two versions side by side, one row per metric name (sorted)."""
    first, second = get_version(a), get_version(b)
    names = sorted(set(first.metrics) | set(second.metrics))
    return [MetricComparison(n, first.metrics.get(n), second.metrics.get(n)) for n in names]


def _download_files(client: MlflowClient, model_id: str, dest: Path) -> Path:
    """The model's files exactly as stored, at ``dest`` (which must not exist yet).

    Read from the logged model's artifact location rather than through ``models:/``,
    which adds a ``registered_model_meta`` file of its own.
    """
    mlflow = import_mlflow()
    location = client.get_logged_model(model_id).artifact_location
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".flood-download-", dir=dest.parent))
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(staging))
        Path(local).rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def stored_model_sha256(client: MlflowClient, model_id: str) -> str:
    with tempfile.TemporaryDirectory(prefix="flood-model-") as tmp:
        return sha256_tree(_download_files(client, model_id, Path(tmp) / "model"))


def _registered_files(mv: ModelVersion) -> tuple[str, str]:
    """The logged model id and the recorded checksum of a version."""
    tags = mv.tags or {}
    expected = tags.get(TAG_MODEL_SHA256)
    if not expected:
        raise ModelIntegrityError(f"{mv.name} v{mv.version} has no recorded {TAG_MODEL_SHA256}")
    model_id = mv.model_id or tags.get(TAG_MODEL_ID)
    if not model_id:
        raise RegistryError(f"{mv.name} v{mv.version} is not linked to a logged model")
    return model_id, expected


def _mismatch(mv: ModelVersion, actual: str, expected: str) -> ModelIntegrityError:
    return ModelIntegrityError(
        f"{mv.name} v{mv.version}: model files changed since registration "
        f"(sha256 {actual[:12]}..., registered {expected[:12]}...)"
    )


def verify_stored_model(client: MlflowClient, mv: ModelVersion) -> None:
    """Raise ``ModelIntegrityError`` unless the stored files match ``model_sha256``."""
    model_id, expected = _registered_files(mv)
    actual = stored_model_sha256(client, model_id)
    if actual != expected:
        raise _mismatch(mv, actual, expected)


def download_model(version: int, dest: Path) -> Path:
    """The version's model directory at ``dest``, checked against ``model_sha256``.

    ``dest`` must be empty or absent; it is returned. The pipeline is at
    ``registry.pipeline_path(dest)``, i.e. ``dest/artifacts/pipeline.skops``. On a checksum
    mismatch nothing is left at ``dest`` and ``ModelIntegrityError`` is raised.
    """
    client = connect()
    mv = fetch_model_version(client, version)
    model_id, expected = _registered_files(mv)
    if dest.exists():
        if any(dest.iterdir()):
            raise RegistryError(f"{dest} is not empty; download_model needs a fresh directory")
        dest.rmdir()
    try:
        actual = sha256_tree(_download_files(client, model_id, dest))
    except Exception as exc:
        shutil.rmtree(dest, ignore_errors=True)
        if isinstance(exc, RegistryError):
            raise
        raise RegistryError(f"cannot download {mv.name} v{version}: {exc}") from exc
    if actual != expected:
        shutil.rmtree(dest, ignore_errors=True)
        raise _mismatch(mv, actual, expected)
    logger.info("downloaded %s v%s to %s (sha256 verified)", mv.name, version, dest)
    return dest


def load_pipeline(version: int) -> Pipeline:
    """The fitted sklearn Pipeline of a version, checksum-verified and type-checked."""
    with tempfile.TemporaryDirectory(prefix="flood-model-") as tmp:
        model_dir = download_model(version, Path(tmp) / "model")
        return load_pipeline_file(pipeline_path(model_dir))
