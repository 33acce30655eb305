"""Our Prometheus metrics, beside BentoML's built-in ones on the same ``/metrics``.

They are created on first use, inside a worker: BentoML sets ``PROMETHEUS_MULTIPROC_DIR``
when a worker starts, and only metrics created after that are written where the
``/metrics`` route of any worker aggregates them. Labels are bounded: three risk levels,
the few model versions one Bento can serve (one), a handful of routes, the four reasons a
key is refused, the configured tiers.

Metrics that are not per-process counts (the backup catalogue, read from files at scrape
time) cannot live in that multiprocess registry; :func:`scrape_time_metrics` renders them
for the API service to append to BentoML's ``/metrics`` output.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class ServingMetrics:
    predictions: Counter
    prediction_latency: Histogram
    batch_size: Histogram
    auth_refusals: Counter
    rate_limited: Counter
    ratelimit_fallback_decisions: Counter
    ratelimit_redis_failures: Counter
    prediction_log_journaled_rows: Counter


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
        auth_refusals=Counter(
            "flood_auth_refusals_total",
            "Requests refused for their API key: missing, unknown, revoked, expired, unavailable",
            labelnames=["reason"],
        ),
        rate_limited=Counter(
            "flood_rate_limited_total",
            "Requests refused by the rate limiter (429, or 413 when one request exceeds the limit)",
            labelnames=["tier"],
        ),
        ratelimit_fallback_decisions=Counter(
            "flood_ratelimit_fallback_decisions_total",
            "Rate-limit decisions made in-process because Redis was unreachable (fail-open)",
        ),
        ratelimit_redis_failures=Counter(
            "flood_ratelimit_redis_failures_total",
            "Failed calls to the Redis rate-limit store",
        ),
        prediction_log_journaled_rows=Counter(
            "flood_prediction_log_journaled_rows_total",
            "Prediction-log rows written to the local journal because the database was unreachable",
        ),
    )


@functools.cache
def _scrape_time_registry() -> CollectorRegistry:
    from ops.backup import BackupMetricsCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(BackupMetricsCollector())
    return registry


def scrape_time_metrics() -> str:
    """Metrics read at scrape time, in the text format, to append to ``/metrics``."""
    return generate_latest(_scrape_time_registry()).decode("utf-8")
