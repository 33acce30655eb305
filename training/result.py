"""What one training run produces: the contract between ``training`` and ``registry``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from sklearn.pipeline import Pipeline


@dataclass(frozen=True)
class Thresholds:
    """P(flood) cut-offs for the risk levels: Safe < alert <= Alert < critical <= Critical."""

    alert: float
    critical: float
    rule: str  # how they were chosen, for people reading the registry

    def risk_level(self, probability: float) -> str:
        if probability >= self.critical:
            return "Critical"
        if probability >= self.alert:
            return "Alert"
        return "Safe"

    def as_tags(self) -> dict[str, str]:
        return {
            # repr round-trips a float exactly: served risk levels match training's
            "threshold_alert": repr(self.alert),
            "threshold_critical": repr(self.critical),
            "threshold_rule": self.rule,
        }

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Thresholds:
        return cls(
            alert=float(tags["threshold_alert"]),
            critical=float(tags["threshold_critical"]),
            rule=tags.get("threshold_rule", ""),
        )


@dataclass
class TrainingResult:
    pipeline: Pipeline  # FeatureBuilder -> RandomForestClassifier(n_jobs=1), fitted on all labelled years
    thresholds: Thresholds
    data_source: str  # "real" | "synthetic"
    params: dict[str, Any]
    metrics: dict[str, float]  # flat, MLflow-loggable headline metrics
    per_year: pd.DataFrame  # one row per (split, test year, scorer): model and baseline side by side
    validation_passed: bool
    validation_reason: str
    file_sha256: dict[str, str] = field(default_factory=dict)
    plots: dict[str, Path] = field(default_factory=dict)  # name -> PNG path
    input_example: pd.DataFrame | None = None
    report_markdown: str = ""
