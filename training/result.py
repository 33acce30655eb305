"""What one training run produces: the contract between ``training`` and ``registry``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from sklearn.pipeline import Pipeline

from core.risk import Thresholds


@dataclass
class TrainingResult:
    pipeline: Pipeline  # the winner: FeatureBuilder -> calibrated classifier, fitted on all labelled years
    thresholds: Thresholds
    data_source: str  # "real" | "synthetic"
    params: dict[str, Any]
    metrics: dict[str, float]  # flat, MLflow-loggable headline metrics of the winner
    per_year: pd.DataFrame  # one row per (candidate, test year), every candidate
    validation_passed: bool
    validation_reason: str
    file_sha256: dict[str, str] = field(default_factory=dict)
    plots: dict[str, Path] = field(default_factory=dict)  # name -> PNG path
    input_example: pd.DataFrame | None = None
    report_markdown: str = ""
    candidate: str = ""  # the winner's name (training.model.CANDIDATES)
    leaderboard: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per candidate, pooled
    selection: str = ""  # why the winner won, by training.selection's rules
