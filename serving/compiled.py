"""The forest compiled to ONNX, so one row costs microseconds instead of a sklearn call.

The ``FeatureBuilder`` stays in Python (it is a few numpy operations); only the forest
is compiled, by ``flood bento build``, which also checks it against sklearn. The graph
takes doubles and is fed features rounded to float32, as sklearn's trees see them.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

# The graph's input, named by the compiler and fed by CompiledForest.
INPUT_NAME = "features"
_PROBABILITIES = "probabilities"


def round_like_sklearn(features: np.ndarray) -> np.ndarray:
    """Features as the sklearn trees see them (float32), carried in float64 for the graph."""
    return np.asarray(features, dtype=np.float32).astype(np.float64)


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
        (proba,) = self._session.run([self._output], {INPUT_NAME: round_like_sklearn(features)})
        return np.asarray(proba, dtype=np.float64)[:, 1]
