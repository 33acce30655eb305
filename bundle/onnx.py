"""The forest compiled to ONNX at build time, and the gate it must pass to be served.

scikit-learn's trees compare float32 copies of the features against float64 thresholds, so
the graph takes doubles (thresholds and sums stay float64) and the served
``serving.compiled.CompiledForest`` feeds it features rounded to float32: that reproduces
sklearn's comparisons exactly, and the only difference left is summation order (measured
~4e-8, the gate is 1e-6). A model whose graph fails the gate is served with sklearn.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from core.checksum import sha256_file
from core.observation import INPUT_FIELDS
from registry.integrity import PIPELINE_FILE, load_pipeline_file
from serving.compiled import INPUT_NAME, CompiledForest
from serving.predictor import ONNX_FILE

logger = logging.getLogger(__name__)

AGREEMENT_TOLERANCE = 1e-6
PROBE_ROWS = 2000


def compile_forest(pipeline: Pipeline) -> bytes:
    """The pipeline's forest as a serialized ONNX graph: doubles in, P(class) out."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import DoubleTensorType

    forest = pipeline.named_steps["model"]
    n_features = int(forest.n_features_in_)
    graph = convert_sklearn(
        forest,
        initial_types=[(INPUT_NAME, DoubleTensorType([None, n_features]))],
        options={id(forest): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    return bytes(graph.SerializeToString())


@dataclass(frozen=True)
class AgreementReport:
    rows: int
    max_abs_diff: float
    tolerance: float

    @property
    def agrees(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def check_agreement(pipeline: Pipeline, compiled: CompiledForest, raw_rows: np.ndarray) -> AgreementReport:
    """Max |P_onnx - P_sklearn| over raw observation rows the model was not fitted on."""
    features = pipeline.named_steps["features"].transform(raw_rows)
    expected = pipeline.named_steps["model"].predict_proba(features)[:, 1]
    got = compiled.predict_positive(features)
    diff = float(np.max(np.abs(got - expected))) if len(expected) else 0.0
    return AgreementReport(rows=len(expected), max_abs_diff=diff, tolerance=AGREEMENT_TOLERANCE)


def sample_observations(n: int, *, seed: int = 0) -> np.ndarray:
    """Valid raw observation rows across the input ranges, some optionals missing.

    They are held out by construction (drawn, not taken from training data) and reach
    the corners of the input space that a compiled forest must also get right.
    """
    rng = np.random.default_rng(seed)
    spec = {f.name: f for f in INPUT_FIELDS}
    rain = np.minimum(rng.exponential(40.0, n) * (rng.random(n) < 0.7), spec["rainfall"].maximum)
    rain3 = rain + rng.exponential(30.0, n)
    rain7 = rain3 + rng.exponential(40.0, n)
    columns = {
        "temperature": rng.uniform(spec["temperature"].minimum, spec["temperature"].maximum, n),
        "humidity": rng.uniform(0.0, 100.0, n),
        "rainfall": rain,
        "rainfall_3d": np.minimum(rain3, spec["rainfall_3d"].maximum),
        "rainfall_7d": np.minimum(rain7, spec["rainfall_7d"].maximum),
        "wind_speed": rng.uniform(0.0, 20.0, n),
        "month": rng.integers(1, 13, n).astype(np.float64),
    }
    raw = np.column_stack([columns[f.name] for f in INPUT_FIELDS])
    for i, f in enumerate(INPUT_FIELDS):
        if not f.required:
            raw[rng.random(n) < 0.2, i] = np.nan
    return raw


def write_compiled_forest(model_dir: Path, *, probe_rows: np.ndarray) -> dict[str, Any]:
    """Compile the forest beside the pipeline and record whether it agrees with sklearn."""
    pipeline = load_pipeline_file(model_dir / PIPELINE_FILE)
    report: dict[str, Any]
    try:
        graph = compile_forest(pipeline)
        agreement = check_agreement(pipeline, CompiledForest(graph), probe_rows)
    except Exception as exc:  # any converter failure means "serve with sklearn", not "no Bento"
        logger.warning("ONNX conversion failed, the Bento will serve with sklearn: %s", exc)
        return {"agrees": False, "error": str(exc)}
    report = {
        "agrees": agreement.agrees,
        "rows": agreement.rows,
        "max_abs_diff": agreement.max_abs_diff,
        "tolerance": agreement.tolerance,
    }
    if agreement.agrees:
        (model_dir / ONNX_FILE).write_bytes(graph)
        report["onnx_sha256"] = sha256_file(model_dir / ONNX_FILE)
    else:
        logger.warning(
            "ONNX forest differs from sklearn by %.3g > %.0e; serving with sklearn",
            agreement.max_abs_diff,
            agreement.tolerance,
        )
    return report
