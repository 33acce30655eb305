from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from core.errors import DataError
from core.risk import Thresholds
from training.data import Dataset
from training.evaluation import (
    budget_threshold,
    choose_thresholds,
    evaluate_candidate,
    evaluate_rule_baseline,
    pick_rule,
    precision_recall_at,
)
from training.model import CANDIDATE_NAMES, Candidate, get_candidate
from training.pipeline import train_model
from training.result import TrainingResult


def test_budget_threshold_is_the_lowest_within_budget() -> None:
    p = np.random.default_rng(0).random(1000)
    t = budget_threshold(p, 0.15)
    assert np.mean(p >= t) <= 0.15
    lower = p[p < t].max()
    assert np.mean(p >= lower) > 0.15


def test_budget_threshold_with_ties_alerts_on_nothing_rather_than_too_much() -> None:
    p = np.full(100, 0.02)
    t = budget_threshold(p, 0.15)
    assert t > 0.02
    assert np.mean(p >= t) == 0.0


def test_thresholds_keep_both_budgets_and_report_recall() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(3000) < 0.03).astype(int)
    p = np.clip(0.2 * y + rng.random(3000) * 0.5, 0, 1)
    t = choose_thresholds(p, y, alert_budget=0.15, critical_budget=0.03)
    assert t.alert < t.critical
    assert t.alert_rate == pytest.approx(np.mean(p >= t.alert)) and t.alert_rate <= 0.15
    assert t.critical_rate == pytest.approx(np.mean(p >= t.critical)) and t.critical_rate <= 0.03
    assert t.alert_recall == pytest.approx(precision_recall_at(y, p, t.alert)[1])
    assert t.critical_recall <= t.alert_recall
    with pytest.raises(ValueError, match="critical_budget < alert_budget"):
        choose_thresholds(p, y, alert_budget=0.03, critical_budget=0.15)


def test_risk_levels_follow_thresholds_and_survive_tags() -> None:
    t = Thresholds(alert=0.2, critical=0.6, rule="r", alert_rate=0.15, alert_recall=0.5)
    assert [t.risk_level(p) for p in (0.0, 0.2, 0.59, 0.6, 1.0)] == [
        "Safe",
        "Alert",
        "Alert",
        "Critical",
        "Critical",
    ]
    back = Thresholds.from_tags(t.as_tags())
    assert back == t
    assert math.isnan(back.critical_recall)
    # Versions registered before rates existed still read, with the rates unknown.
    old = Thresholds.from_tags({"threshold_alert": "0.2", "threshold_critical": "0.6"})
    assert math.isnan(old.alert_rate)


def test_test_year_labels_never_reach_its_own_thresholds(synthetic_dataset: Dataset) -> None:
    """Scrambling 2023's labels must not move the thresholds 2023 is scored at."""
    table = synthetic_dataset.table
    scrambled = table.copy()
    in_2023 = scrambled["year"] == 2023
    scrambled.loc[in_2023, "flood"] = np.random.default_rng(5).permutation(
        scrambled.loc[in_2023, "flood"].to_numpy()
    )
    candidate = get_candidate("forest_small")
    a = evaluate_candidate(table, candidate, n_estimators=20).per_year.set_index("test_year")
    b = evaluate_candidate(scrambled, candidate, n_estimators=20).per_year.set_index("test_year")

    def at(frame: pd.DataFrame, column: str) -> float:
        return float(frame.loc[2023, column])  # type: ignore[arg-type]

    assert at(a, "alert_threshold") == at(b, "alert_threshold")
    assert at(a, "critical_threshold") == at(b, "critical_threshold")
    assert at(a, "pr_auc") != at(b, "pr_auc")


def test_one_year_is_not_enough(synthetic_dataset: Dataset) -> None:
    one_year = synthetic_dataset.table[synthetic_dataset.table["year"] == 2022]
    with pytest.raises(DataError, match="two labelled years"):
        evaluate_candidate(one_year, get_candidate("rule_1d"))


def test_the_training_years_pick_the_rule_that_ranks_their_floods() -> None:
    rain = np.array([0, 1, 2, 3, 50, 60, 0, 1, 2, 3, 70, 80], dtype=float)
    table = pd.DataFrame(
        {
            "year": [2022] * 6 + [2023] * 6,
            "rainfall": rain,
            "rainfall_3d": rain[::-1].copy(),  # ranks floods worst
            "rainfall_7d": rain[::-1].copy(),
            "flood": [0, 0, 0, 0, 1, 1] * 2,
        }
    )
    assert pick_rule(table) == "rule_1d"
    baseline = evaluate_rule_baseline(table)
    assert baseline.picks == {2022: "rule_1d", 2023: "rule_1d"}
    assert baseline.pr_auc == pytest.approx(1.0)


def test_training_reports_every_candidate_every_year(synthetic_result: TrainingResult) -> None:
    per_year = synthetic_result.per_year
    assert set(per_year["candidate"]) == set(CANDIDATE_NAMES)
    assert (per_year.groupby("candidate")["test_year"].apply(sorted) == pd.Series([[2022, 2023]] * 7,
            index=sorted(CANDIDATE_NAMES))).all()  # fmt: skip
    for column in ("pr_auc", "roc_auc", "brier", "alert_rate", "recall_alert", "recall_critical"):
        assert per_year[column].between(0, 1).all(), column
    board = synthetic_result.leaderboard
    assert sorted(board["candidate"]) == sorted(CANDIDATE_NAMES)
    assert board["winner"].sum() == 1
    assert board.loc[board["winner"], "candidate"].item() == synthetic_result.candidate
    report = synthetic_result.report_markdown
    for name in CANDIDATE_NAMES:
        assert f"| {name} |" in report
    assert "Selection (training/selection.py" in report
    assert synthetic_result.data_source == "synthetic"
    assert set(synthetic_result.plots) == {"leaderboard", "precision_recall", "calibration"}
    for name, path in synthetic_result.plots.items():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert isinstance(synthetic_result.input_example, pd.DataFrame)


def test_served_thresholds_keep_the_budgets_out_of_year(synthetic_result: TrainingResult) -> None:
    t = synthetic_result.thresholds
    assert 0 < t.alert < t.critical <= 1
    assert 0 < t.alert_rate <= 0.15
    assert 0 < t.critical_rate <= 0.03
    assert synthetic_result.metrics["oof_alert_rate"] == pytest.approx(t.alert_rate)


def test_probabilities_are_frequencies_out_of_year(synthetic_result: TrainingResult) -> None:
    ratio = synthetic_result.metrics["oof_calibration_ratio"]
    assert 0.5 <= ratio <= 2.0
    # Better than always forecasting the training years' flood rate.
    assert synthetic_result.metrics["oof_bss"] > 0


def test_synthetic_model_validates(synthetic_result: TrainingResult) -> None:
    # the generator's rule is learnable: a model that cannot beat chance on it is broken
    assert synthetic_result.validation_passed, synthetic_result.validation_reason
    assert synthetic_result.metrics["oof_pr_auc"] > 2 * synthetic_result.metrics["prevalence"]


class _Unfittable(LogisticRegression):
    def fit(self, X: object, y: object, sample_weight: object = None) -> _Unfittable:  # noqa: N803
        raise ValueError("injected: this family cannot be fitted")


def test_a_family_that_cannot_be_fitted_leaves_the_race(synthetic_dataset: Dataset, tmp_path: Path) -> None:
    broken = Candidate("broken", "fault injection", 1, ("log_rainfall",), lambda n, seed: _Unfittable())
    result = train_model(
        synthetic_dataset,
        n_estimators=10,
        reports_dir=tmp_path,
        candidates=(broken, get_candidate("rule_1d")),
    )
    assert result.candidate == "rule_1d"
    assert list(result.leaderboard["candidate"]) == ["rule_1d"]
    with pytest.raises(DataError, match="no candidate could be fitted"):
        train_model(synthetic_dataset, reports_dir=tmp_path, candidates=(broken,))
