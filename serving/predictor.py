"""The model as the service holds it: pipeline, optional compiled forest, thresholds.

Everything the service says about its model comes from the BentoML model's labels, which
``flood bento build`` wrote from the registry version it pinned; serving never talks to
MLflow.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from core.checksum import sha256_file
from core.errors import ModelIntegrityError
from core.risk import Thresholds
from registry.integrity import PIPELINE_FILE, load_pipeline_file
from serving.compiled import CompiledForest

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
COMPILED_REPORT_FILE = "compiled.json"


@dataclass(frozen=True)
class ServedModel:
    """The registry version a Bento pins, as recorded in the BentoML model's labels."""

    name: str
    version: int
    bento_model_tag: str
    run_id: str
    data_source: str
    sha256: str  # the registry's checksum of the whole MLflow model directory
    pipeline_sha256: str  # the pipeline file copied into the BentoML model
    thresholds: Thresholds
    validation_status: str
    metrics: dict[str, float] = field(default_factory=dict)
    created_at: str = ""

    def to_labels(self) -> dict[str, str]:
        return {
            "mlflow_model": self.name,
            "mlflow_version": str(self.version),
            "run_id": self.run_id,
            "sha256": self.sha256,
            "pipeline_sha256": self.pipeline_sha256,
            "data_source": self.data_source,
            "validation_status": self.validation_status,
            "created_at": self.created_at,
            **self.thresholds.as_tags(),
        }

    @classmethod
    def from_labels(
        cls, labels: dict[str, str], *, bento_model_tag: str, metrics: dict[str, Any]
    ) -> ServedModel:
        try:
            return cls(
                name=labels["mlflow_model"],
                version=int(labels["mlflow_version"]),
                bento_model_tag=bento_model_tag,
                run_id=labels["run_id"],
                data_source=labels["data_source"],
                sha256=labels["sha256"],
                pipeline_sha256=labels["pipeline_sha256"],
                thresholds=Thresholds.from_tags(labels),
                validation_status=labels.get("validation_status", ""),
                metrics={k: float(v) for k, v in metrics.items()},
                created_at=labels.get("created_at", ""),
            )
        except (KeyError, ValueError) as exc:
            raise ModelIntegrityError(
                f"BentoML model {bento_model_tag} lacks registry labels ({exc}); "
                "import models with `flood bento build`"
            ) from exc


class Predictor:
    """P(flood) for raw observation rows, through ONNX when it was verified at build time."""

    def __init__(self, pipeline: Pipeline, compiled: CompiledForest | None) -> None:
        self._pipeline = pipeline
        self._features = pipeline.named_steps["features"]
        self._compiled = compiled

    @classmethod
    def from_model_dir(cls, model_dir: Path, *, expected_sha256: str) -> Predictor:
        pipeline_path = model_dir / PIPELINE_FILE
        actual = sha256_file(pipeline_path)
        if actual != expected_sha256:
            raise ModelIntegrityError(
                f"{pipeline_path}: sha256 {actual} does not match the pinned {expected_sha256}"
            )
        pipeline = load_pipeline_file(pipeline_path)
        return cls(pipeline, load_compiled(model_dir))

    def predict_proba(self, raw: np.ndarray) -> np.ndarray:
        """P(flood) per row of a raw matrix (columns ``core.observation.FIELD_NAMES``)."""
        if len(raw) == 0:
            return np.empty(0, dtype=np.float64)
        features = self._features.transform(raw)
        if self._compiled is not None:
            return self._compiled.predict_positive(features)
        return np.asarray(self._pipeline.named_steps["model"].predict_proba(features)[:, 1])


def verified_onnx(model_dir: Path) -> Path | None:
    """The compiled forest's file if the build verified it and it is unchanged, else None."""
    report_path = model_dir / COMPILED_REPORT_FILE
    graph_path = model_dir / ONNX_FILE
    if not (report_path.is_file() and graph_path.is_file()):
        return None
    report = json.loads(report_path.read_text())
    if not report.get("agrees") or report.get("onnx_sha256") != sha256_file(graph_path):
        logger.warning("ONNX forest in %s is unverified or altered; ignoring it", model_dir)
        return None
    return graph_path


def load_compiled(model_dir: Path) -> CompiledForest | None:
    """The compiled forest if the build verified it, else None (sklearn serves)."""
    graph_path = verified_onnx(model_dir)
    if graph_path is None:
        logger.info("no verified ONNX forest in %s; serving with scikit-learn", model_dir)
        return None
    return CompiledForest(graph_path.read_bytes())


def engine_for(model_dir: Path) -> str:
    return "onnxruntime" if verified_onnx(model_dir) is not None else "sklearn"
