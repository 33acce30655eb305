"""The forest compiled to ONNX, so one row costs microseconds instead of a sklearn call.

The ``FeatureBuilder`` stays in Python (it is a few numpy operations); only the forest
is compiled. scikit-learn's trees compare float32 copies of the features against float64
thresholds, so the compiled model takes doubles (thresholds and sums stay float64) and is
fed features rounded to float32: that reproduces sklearn's comparisons exactly, and the
only difference left is summation order (measured ~4e-8, the gate is 1e-6).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from sklearn.pipeline import Pipeline

logger = logging.getLogger(__name__)

AGREEMENT_TOLERANCE = 1e-6
_INPUT = "features"
_PROBABILITIES = "probabilities"


def round_like_sklearn(features: np.ndarray) -> np.ndarray:
    """Features as the sklearn trees see them (float32), carried in float64 for the graph."""
    return np.asarray(features, dtype=np.float32).astype(np.float64)


def compile_forest(pipeline: Pipeline) -> bytes:
    """The pipeline's forest as a serialized ONNX graph: doubles in, P(class) out."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import DoubleTensorType

    forest = pipeline.named_steps["model"]
    n_features = int(forest.n_features_in_)
    graph = convert_sklearn(
        forest,
        initial_types=[(_INPUT, DoubleTensorType([None, n_features]))],
        options={id(forest): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    return bytes(graph.SerializeToString())


class CompiledForest:
    """An ONNX Runtime session over a compiled forest, one thread, as one worker gets."""

    def __init__(self, graph: bytes) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # Parallelism comes from workers and batching; threads would fight over 2 cores.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        outputs = [o.name for o in self._session.get_outputs()]
        self._output = _PROBABILITIES if _PROBABILITIES in outputs else outputs[-1]

    def predict_positive(self, features: np.ndarray) -> np.ndarray:
        """P(class 1) for each row of a feature matrix."""
        (proba,) = self._session.run([self._output], {_INPUT: round_like_sklearn(features)})
        return np.asarray(proba, dtype=np.float64)[:, 1]


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
