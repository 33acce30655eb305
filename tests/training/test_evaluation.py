from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.errors import DataError
from training.data import Dataset
from training.evaluation import (
    _precision_recall_at,
    choose_thresholds,
    evaluate_by_year,
    fit_rainfall_cutoff,
)
from training.model import build_pipeline
from training.result import Thresholds, TrainingResult


def test_rainfall_cutoff_separates_a_clean_split() -> None:
    rain = np.array([0, 2, 5, 8, 40, 60, 80, 10])
    y = np.array([0, 0, 0, 0, 1, 1, 1, 0])
    assert fit_rainfall_cutoff(rain, y) == 40


def test_thresholds_meet_their_targets() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(2000) < 0.05).astype(int)
    p = np.clip(0.3 * y + rng.random(2000) * 0.7, 0, 1)
    t = choose_thresholds(y, p)
    _, recall_alert = _precision_recall_at(y, p, t.alert)
    precision_critical, _ = _precision_recall_at(y, p, t.critical)
    assert recall_alert >= 0.9
    assert t.critical > t.alert
    assert precision_critical >= 0.5 or "not reachable" in t.rule
    # the highest alert cut-off that keeps the recall target
    higher = p[p > t.alert].min()
    assert _precision_recall_at(y, p, float(higher))[1] < 0.9


def test_thresholds_need_a_flood() -> None:
    with pytest.raises(DataError, match="without any flood"):
        choose_thresholds(np.zeros(10, dtype=int), np.linspace(0, 1, 10))


def test_risk_levels_follow_thresholds() -> None:
    t = Thresholds(alert=0.2, critical=0.6, rule="r")
    assert [t.risk_level(p) for p in (0.0, 0.2, 0.59, 0.6, 1.0)] == [
        "Safe",
        "Alert",
        "Alert",
        "Critical",
        "Critical",
    ]
    assert Thresholds.from_tags(t.as_tags()) == t


def test_test_year_labels_never_reach_its_own_thresholds(synthetic_dataset: Dataset) -> None:
    """Scrambling 2023's labels must not move the thresholds 2023 is scored at."""
    make = lambda: build_pipeline(n_estimators=15)  # noqa: E731
    table = synthetic_dataset.table
    scrambled = table.copy()
    in_2023 = scrambled["year"] == 2023
    scrambled.loc[in_2023, "flood"] = np.random.default_rng(5).permutation(
        scrambled.loc[in_2023, "flood"].to_numpy()
    )
    a = evaluate_by_year(table, make).per_year.set_index("test_year")
    b = evaluate_by_year(scrambled, make).per_year.set_index("test_year")

    def at(frame: pd.DataFrame, column: str) -> float:
        return float(frame.loc[2023, column])  # type: ignore[arg-type]

    assert at(a, "alert_threshold") == at(b, "alert_threshold")
    assert at(a, "critical_threshold") == at(b, "critical_threshold")
    assert at(a, "model_pr_auc") != at(b, "model_pr_auc")


def test_one_year_is_not_enough(synthetic_dataset: Dataset) -> None:
    one_year = synthetic_dataset.table[synthetic_dataset.table["year"] == 2022]
    with pytest.raises(DataError, match="two labelled years"):
        evaluate_by_year(one_year, lambda: build_pipeline(n_estimators=5))


def test_training_result_reports_every_year_beside_the_baseline(synthetic_result: TrainingResult) -> None:
    per_year = synthetic_result.per_year
    assert sorted(per_year["test_year"]) == [2022, 2023]
    for column in ("model_pr_auc", "baseline_pr_auc", "model_recall_alert", "baseline_recall"):
        assert per_year[column].between(0, 1).all()
    assert "| 2022 |" in synthetic_result.report_markdown
    assert "| 2023 |" in synthetic_result.report_markdown
    assert synthetic_result.data_source == "synthetic"
    for name, path in synthetic_result.plots.items():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert isinstance(synthetic_result.input_example, pd.DataFrame)
    assert 0 < synthetic_result.thresholds.alert < synthetic_result.thresholds.critical <= 1


def test_synthetic_model_validates(synthetic_result: TrainingResult) -> None:
    # the generator's rule is learnable: a model that cannot beat chance on it is broken
    assert synthetic_result.validation_passed, synthetic_result.validation_reason
    assert synthetic_result.metrics["oof_pr_auc"] > 2 * synthetic_result.metrics["prevalence"]
