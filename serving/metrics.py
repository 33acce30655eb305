"""Our Prometheus metrics, beside BentoML's built-in ones on the same ``/metrics``.

They are created on first use, inside a worker: BentoML sets ``PROMETHEUS_MULTIPROC_DIR``
when a worker starts, and only metrics created after that are written where the
``/metrics`` route of any worker aggregates them. Labels are bounded: three risk levels,
the few model versions one Bento can serve (one), a handful of routes, the four reasons a
key is refused, the configured tiers.

Metrics that are not per-process counts (the backup catalogue, read from files at scrape
time by :class:`BackupMetricsCollector`) cannot live in that multiprocess registry;
:func:`scrape_time_metrics` renders them for the API service to append to BentoML's
``/metrics`` output.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ops.backup.catalogue import backup_summary

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class ServingMetrics:
    predictions: Counter
    prediction_latency: Histogram
    batch_size: Histogram
    auth_refusals: Counter
    auth_throttled: Counter
    rate_limited: Counter
    ratelimit_fallback_decisions: Counter
    ratelimit_redis_failures: Counter
    prediction_log_journaled_rows: Counter
    prediction_log_rejected_rows: Counter
    prediction_log_quarantined_lines: Counter
    prediction_log_refused_rows: Counter
    prediction_log_writer_restarts: Counter


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
        auth_throttled=Counter(
            "flood_auth_throttled_total",
            "Requests refused (429) because their client address failed authentication too often",
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
            "Prediction-log rows that waited in the local journal because the database did not take them",
        ),
        prediction_log_rejected_rows=Counter(
            "flood_prediction_log_rejected_rows_total",
            "Prediction-log rows the database refused for good, kept in rejected-*.jsonl "
            "(flood db replay-rejected)",
        ),
        prediction_log_quarantined_lines=Counter(
            "flood_prediction_log_quarantined_lines_total",
            "Journal lines that were not prediction records (a truncated write), moved to quarantine-*.jsonl",
        ),
        prediction_log_refused_rows=Counter(
            "flood_prediction_log_refused_rows_total",
            "Predictions refused (503) because neither the journal nor the database could keep their rows",
        ),
        prediction_log_writer_restarts=Counter(
            "flood_prediction_log_writer_restarts_total",
            "Prediction-log threads restarted by their supervisor after an unexpected error",
        ),
    )


class BackupMetricsCollector(Collector):
    """Prometheus gauges read from the backup catalogue at scrape time.

    Register it on the registry that serves ``/metrics``; it reads a directory of small JSON
    files, so a scrape costs a few milliseconds and never touches the database.
    """

    def __init__(self, backup_dir: Path | None = None) -> None:
        self._backup_dir = backup_dir

    def collect(self) -> Iterator[Metric]:
        try:
            summary = backup_summary(backup_dir=self._backup_dir)
        except Exception:
            # A scrape must not fail because the backups volume is missing or unreadable;
            # the absent last-success gauge is what the alert fires on.
            logger.exception("cannot read the backup catalogue")
            return
        success = GaugeMetricFamily(
            "flood_backup_last_success_timestamp_seconds",
            "Unix time the newest backup of each kind started",
            labels=["kind"],
        )
        size = GaugeMetricFamily(
            "flood_backup_last_size_bytes", "Size of the newest backup of each kind", labels=["kind"]
        )
        duration = GaugeMetricFamily(
            "flood_backup_last_duration_seconds",
            "How long the newest backup of each kind took",
            labels=["kind"],
        )
        for kind, manifest in sorted(summary.latest.items()):
            success.add_metric([kind], manifest.created_at.timestamp())
            size.add_metric([kind], manifest.size_bytes)
            duration.add_metric([kind], manifest.duration_seconds)
        files = GaugeMetricFamily("flood_backup_files", "Backups kept, by kind", labels=["kind"])
        for kind, count in sorted(summary.counts.items()):
            files.add_metric([kind], count)
        failures = CounterMetricFamily(
            "flood_backup_failures", "Backup attempts that failed", value=summary.failures_total
        )
        yield from (success, size, duration, files, failures)
        if summary.last_failure_at is not None:
            yield GaugeMetricFamily(
                "flood_backup_last_failure_timestamp_seconds",
                "Unix time of the last failed backup attempt",
                value=summary.last_failure_at.timestamp(),
            )


@functools.cache
def _scrape_time_registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BackupMetricsCollector())
    return registry


def scrape_time_metrics() -> str:
    """Metrics read at scrape time, in the text format, to append to ``/metrics``."""
    return generate_latest(_scrape_time_registry()).decode("utf-8")
