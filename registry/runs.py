"""Logging a training run to MLflow and registering its model as a new version.

Two steps, usable apart: ``log_run`` records everything about a run (params, metrics,
per-year table, report, plots, input-file checksums, the model) and returns the run id;
``register_run`` turns a logged run into a version of ``settings.flood_model_name``.
``log_training_run`` does both, which is what ``flood train`` wants.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from core.errors import RegistryError
from core.observation import FIELD_NAMES, INPUT_FIELDS
from registry.backend import connect, ensure_experiment, import_mlflow, is_not_found
from registry.integrity import PIPELINE_FILE, save_pipeline
from registry.versions import (
    TAG_CANDIDATE,
    TAG_DATA_SOURCE,
    TAG_MODEL_ID,
    TAG_MODEL_SHA256,
    TAG_RUN_ID,
    TAG_VALIDATION_REASON,
    TAG_VALIDATION_STATUS,
    ModelVersionInfo,
    fetch_model_version,
    model_name,
    stored_model_sha256,
    version_info,
)

if TYPE_CHECKING:
    from mlflow.models import ModelSignature

    # Only the type: the registry takes what training produced, it never runs training.
    from training.result import TrainingResult

logger = logging.getLogger(__name__)

MODEL_ARTIFACT_NAME = "model"
DATA_SHA256_PREFIX = "data_sha256."
# Distributions the logged model needs at load time. Pinned to what is installed so the
# model's environment is the one it was trained in; listed explicitly because MLflow's
# requirement inference re-imports the model and takes seconds. "floodingnaque" (this
# project) provides core.features and registry.pyfunc; it is installed from the repository,
# not from PyPI.
MODEL_DISTRIBUTIONS = ("mlflow", "scikit-learn", "skops", "numpy", "pandas", "floodingnaque")
# MLflow rejects longer tag values; the reason is for people, a long one is cut.
MAX_REASON_CHARS = 4000


def pip_requirements() -> list[str]:
    return [f"{dist}=={importlib.metadata.version(dist)}" for dist in MODEL_DISTRIBUTIONS]


def model_signature() -> ModelSignature:
    """Input: the observation fields (optional ones may be absent); output: P(flood).

    Typed ``Any`` so integers reach the model, which converts them (``registry.pyfunc``).
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec
    from mlflow.types.schema import AnyType

    inputs = Schema(
        [
            # MLflow's AnyType has an unannotated __init__.
            ColSpec(AnyType(), f.name, required=f.required)  # type: ignore[no-untyped-call]
            for f in INPUT_FIELDS
        ]
    )
    outputs = Schema([TensorSpec(np.dtype(np.float64), (-1,))])
    return ModelSignature(inputs=inputs, outputs=outputs)


def table_markdown(table: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float | np.floating):
            return f"{value:.4f}"
        return str(value).replace("|", "\\|")

    columns = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def run_tags(result: TrainingResult) -> dict[str, str]:
    tags = {
        TAG_DATA_SOURCE: result.data_source,
        TAG_CANDIDATE: result.candidate,
        TAG_VALIDATION_STATUS: "passed" if result.validation_passed else "failed",
        TAG_VALIDATION_REASON: result.validation_reason[:MAX_REASON_CHARS],
        **result.thresholds.as_tags(),
    }
    tags.update({data_sha256_tag(name): digest for name, digest in result.file_sha256.items()})
    return tags


def data_sha256_tag(file_name: str) -> str:
    """The run tag holding an input file's checksum: ``data_sha256.<file>``."""
    # MLflow tag keys allow only word characters, "/", ".", "-", " " and ":".
    return DATA_SHA256_PREFIX + re.sub(r"[^\w/.\- :]", "_", file_name)


def loggable_params(params: dict[str, Any]) -> dict[str, str]:
    # Params must be short strings; structured values are logged as JSON.
    return {
        key: value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
        for key, value in params.items()
    }


def input_example(result: TrainingResult) -> pd.DataFrame | None:
    if result.input_example is None:
        return None
    columns = [c for c in FIELD_NAMES if c in result.input_example.columns]
    # The signature declares doubles and MLflow refuses int64 -> float64 as lossy.
    return result.input_example.loc[:, columns].head(5).astype(np.float64)


def finite_metrics(values: dict[str, Any]) -> dict[str, float]:
    # MLflow stores NaN, but a missing metric says "undefined" more plainly in its UI.
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and np.isfinite(v)}


def log_candidate_runs(mlflow: Any, result: TrainingResult, experiment_id: str) -> None:
    """One child run per candidate: its pooled and per-year out-of-year metrics."""
    metric_names = [c for c in result.leaderboard.columns if result.leaderboard[c].dtype.kind == "f"]
    for row in result.leaderboard.to_dict("records"):
        name = str(row["candidate"])
        metrics = finite_metrics({k: row[k] for k in metric_names})
        for year_row in result.per_year[result.per_year["candidate"] == name].to_dict("records"):
            year = year_row["test_year"]
            scores = {k: v for k, v in year_row.items() if k not in ("candidate", "test_year")}
            metrics.update(finite_metrics({f"test_{year}_{k}": v for k, v in scores.items()}))
        with mlflow.start_run(
            experiment_id=experiment_id,
            run_name=name,
            nested=True,
            tags={
                TAG_CANDIDATE: name,
                "winner": str(bool(row["winner"])).lower(),
                "eligible": str(bool(row["eligible"])).lower(),
                "note": str(row["note"])[:MAX_REASON_CHARS],
            },
        ):
            mlflow.log_params({"complexity": int(row["complexity"])})
            mlflow.log_metrics(metrics)


def log_run(result: TrainingResult) -> str:
    """Log one training run with its model; returns the MLflow run id."""
    mlflow = import_mlflow()
    from registry.pyfunc import MODEL_CODE, MODEL_CODE_FILE, PIPELINE_ARTIFACT

    client = connect()
    experiment_id = ensure_experiment(client)
    with tempfile.TemporaryDirectory(prefix="flood-log-") as tmp:
        staging = Path(tmp)
        pipeline_file = save_pipeline(result.pipeline, staging / PIPELINE_FILE)
        code_file = staging / MODEL_CODE_FILE
        code_file.write_text(MODEL_CODE, encoding="utf-8")
        with mlflow.start_run(
            experiment_id=experiment_id,
            run_name=f"train-{result.data_source}",
            tags=run_tags(result),
        ) as run:
            mlflow.log_params(loggable_params(result.params))
            mlflow.log_metrics(finite_metrics(result.metrics))
            per_year_csv = staging / "per_year.csv"
            result.per_year.to_csv(per_year_csv, index=False)
            mlflow.log_artifact(str(per_year_csv))
            mlflow.log_text(table_markdown(result.per_year), "per_year.md")
            mlflow.log_table(result.per_year, artifact_file="per_year.json")
            if result.report_markdown:
                mlflow.log_text(result.report_markdown, "report.md")
            if not result.leaderboard.empty:
                mlflow.log_text(table_markdown(result.leaderboard), "leaderboard.md")
                mlflow.log_table(result.leaderboard, artifact_file="leaderboard.json")
                if result.selection:
                    mlflow.log_text(result.selection, "selection.txt")
                log_candidate_runs(mlflow, result, experiment_id)
            for name, path in sorted(result.plots.items()):
                if not Path(path).is_file():
                    logger.warning("plot %s missing at %s; not logged", name, path)
                    continue
                mlflow.log_artifact(str(path), artifact_path="plots")
            model_info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT_NAME,
                python_model=str(code_file),
                artifacts={PIPELINE_ARTIFACT: str(pipeline_file)},
                signature=model_signature(),
                input_example=input_example(result),
                pip_requirements=pip_requirements(),
            )
            # Hash what the artifact store actually holds, the same bytes download_model reads.
            digest = stored_model_sha256(client, model_info.model_id)
            mlflow.set_tags({TAG_MODEL_SHA256: digest, TAG_MODEL_ID: model_info.model_id})
    run_id: str = run.info.run_id
    logger.info("logged run %s (model %s, sha256 %s)", run_id, model_info.model_id, digest[:12])
    return run_id


def register_run(run_id: str) -> ModelVersionInfo:
    """Register the model of a logged run as the next version of the flood model."""
    from mlflow.exceptions import MlflowException

    client = connect()
    try:
        run = client.get_run(run_id)
    except Exception as exc:
        if is_not_found(exc):
            raise RegistryError(f"no MLflow run {run_id!r}") from None
        raise
    tags = run.data.tags
    model_id = tags.get(TAG_MODEL_ID)
    if not model_id or TAG_MODEL_SHA256 not in tags:
        raise RegistryError(f"run {run_id} has no flood model logged by registry.log_run")
    version_tags = {
        key: value
        for key, value in tags.items()
        if key
        in {TAG_DATA_SOURCE, TAG_CANDIDATE, TAG_MODEL_SHA256, TAG_VALIDATION_STATUS, TAG_VALIDATION_REASON}
        or key.startswith("threshold_")
    }
    version_tags[TAG_RUN_ID] = run_id
    version_tags[TAG_MODEL_ID] = model_id
    name = model_name()
    try:
        client.create_registered_model(name, description="P(flood) for a station-day in Parañaque")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    mv = client.create_model_version(
        name, source=f"models:/{model_id}", run_id=run_id, tags=version_tags, model_id=model_id
    )
    logger.info("registered %s v%s from run %s", name, mv.version, run_id)
    return version_info(client, fetch_model_version(client, int(mv.version)))


def log_training_run(result: TrainingResult) -> ModelVersionInfo:
    """Log a training run and register its model; the new version (no alias moved)."""
    return register_run(log_run(result))
