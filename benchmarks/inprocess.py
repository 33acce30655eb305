"""In-process cost of one model call: scikit-learn against ONNX Runtime, by batch size."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from benchmarks.models import BenchModel, complete_rows
from core.observation import FIELD_NAMES

BATCH_SIZES = (1, 64, 512)


def time_call(call: Callable[[], object], *, budget_s: float, min_calls: int = 5) -> float:
    """Median seconds per call over about ``budget_s`` of repeated calls (after one warm call)."""
    call()
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < min_calls or time.perf_counter() < deadline:
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure_inprocess(
    model: BenchModel, *, batch_sizes: tuple[int, ...] = BATCH_SIZES, budget_s: float = 1.0
) -> dict[str, Any]:
    """Per batch size: µs per call for derived features, the sklearn forest and the ONNX forest."""
    from registry.integrity import PIPELINE_FILE, load_pipeline_file
    from serving.compiled import CompiledForest
    from serving.predictor import ONNX_FILE

    pipeline = load_pipeline_file(model.model_dir / PIPELINE_FILE)
    features_step = pipeline.named_steps["features"]
    forest = pipeline.named_steps["model"]
    onnx_path = model.model_dir / ONNX_FILE
    compiled = CompiledForest(onnx_path.read_bytes()) if onnx_path.is_file() else None
    raw_all = complete_rows(max(batch_sizes), seed=7).loc[:, list(FIELD_NAMES)].to_numpy(np.float64)
    out: dict[str, Any] = {}
    for size in batch_sizes:
        raw = raw_all[:size]
        features = features_step.transform(raw)
        row: dict[str, float | None] = {
            "features_us": time_call(partial(features_step.transform, raw), budget_s=budget_s / 3) * 1e6,
            "sklearn_us": time_call(partial(forest.predict_proba, features), budget_s=budget_s) * 1e6,
            "onnxruntime_us": None,
        }
        if compiled is not None:
            onnx_call = partial(compiled.predict_positive, features)
            row["onnxruntime_us"] = time_call(onnx_call, budget_s=budget_s) * 1e6
        for engine in ("sklearn", "onnxruntime"):
            cost = row[f"{engine}_us"]
            row[f"{engine}_rows_per_s"] = None if cost is None else size / (cost / 1e6)
        out[str(size)] = {k: (None if v is None else round(v, 1)) for k, v in row.items()}
    return out
