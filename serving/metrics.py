"""Our Prometheus metrics, beside BentoML's built-in ones on the same ``/metrics``.

They are created on first use, inside a worker: BentoML sets ``PROMETHEUS_MULTIPROC_DIR``
when a worker starts, and only metrics created after that are written where the
``/metrics`` route of any worker aggregates them. Labels are bounded: three risk levels,
the few model versions one Bento can serve (one), a handful of routes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from prometheus_client import Counter, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class ServingMetrics:
    predictions: Counter
    prediction_latency: Histogram
    batch_size: Histogram


@functools.cache
def get_metrics() -> ServingMetrics:
    return ServingMetrics(
        predictions=Counter(
            "flood_predictions_total",
            "Predictions answered, by risk level and model version",
            labelnames=["risk_level", "model_version"],
        ),
        prediction_latency=Histogram(
            "flood_prediction_latency_seconds",
            "Time from a validated request to its prediction, batching included",
            labelnames=["route"],
            buckets=_LATENCY_BUCKETS,
        ),
        batch_size=Histogram(
            "flood_adaptive_batch_size",
            "Rows per model call after adaptive batching merged concurrent requests",
            buckets=_BATCH_BUCKETS,
        ),
    )
