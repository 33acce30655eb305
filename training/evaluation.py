"""Honest evaluation for a handful of flood days: one protocol for every candidate.

- Outer loop: leave one labelled year out. Each candidate is fitted on the other years
  (its sigmoid calibration included, see ``training.model``) and scores the held-out year.
  Nothing about a test year is fitted on it: not the model, not the calibration, not the
  thresholds it is scored at.
- Thresholds come from alert budgets, not from labels: Alert is the lowest P(flood) whose
  alert rate stays within ``alert_budget`` of station-days, Critical the same for the
  smaller ``critical_budget``. A fold's thresholds are read off the training years'
  predictions; the served thresholds off the pooled out-of-year predictions.
- Calibration: Brier, and the Brier skill score against climatology (the training years'
  flood rate, the forecast a model must beat to be worth more than an average).
- Baseline: the rainfall rule the training years pick, i.e. the 1-, 3- or 7-day sum that
  ranks the training years' floods best (PR-AUC), ranking the test year by that raw sum.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score
from sklearn.pipeline import Pipeline

from core.errors import DataError
from core.observation import FIELD_NAMES
from core.risk import Thresholds
from training.budget import ALERT_BUDGET, CRITICAL_BUDGET
from training.model import RULE_WINDOWS, Candidate
from training.selection import Standing, rain_monotone

logger = logging.getLogger(__name__)

# Each rule candidate's raw sum (its model sees the log of it), in window order.
RULE_SUMS = {name: feature.removeprefix("log_") for name, feature in RULE_WINDOWS.items()}

StepCallback = Callable[[str], None]


class CandidateUnfit(DataError):
    """A candidate family could not be fitted in any outer fold: it leaves the race."""


@dataclass
class CandidateEvaluation:
    candidate: Candidate
    per_year: pd.DataFrame  # one row per test year
    oof_probability: np.ndarray  # out-of-year P(flood) for every row; NaN where a fold failed
    thresholds: Thresholds  # by budget, on the pooled out-of-year predictions
    metrics: dict[str, float]  # pooled out-of-year
    monotone: bool
    complete: bool
    error: str = ""

    def standing(self) -> Standing:
        return Standing(
            name=self.candidate.name,
            complexity=self.candidate.complexity,
            pr_auc=self.metrics["pr_auc"],
            recall_alert=self.metrics["recall_alert"],
            calibration_ratio=self.metrics["calibration_ratio"],
            monotone=self.monotone,
            complete=self.complete,
        )


@dataclass(frozen=True)
class RuleBaseline:
    """The rainfall rule the training years pick, scored out of year."""

    picks: dict[int, str]  # test year -> rule picked on the other years
    final: str  # the rule all labelled years pick
    pr_auc: float  # pooled out-of-year
    roc_auc: float


def _safe(metric: Callable[[np.ndarray, np.ndarray], float], y: np.ndarray, s: np.ndarray) -> float:
    # AUCs are undefined on a single class; NaN says so instead of crashing or inventing 0.
    return float(metric(y, s)) if 0 < y.sum() < len(y) else math.nan


def precision_recall_at(y: np.ndarray, score: np.ndarray, cutoff: float) -> tuple[float, float]:
    flagged = score >= cutoff
    hits = int((flagged & (y == 1)).sum())
    precision = hits / int(flagged.sum()) if flagged.any() else math.nan
    recall = hits / int(y.sum()) if y.sum() else math.nan
    return precision, recall


def budget_threshold(probability: np.ndarray, budget: float) -> float:
    """The lowest cut-off whose alert rate (share of rows at or above it) is within ``budget``."""
    if len(probability) == 0:
        raise DataError("cannot choose a threshold without predictions")
    ordered = np.sort(probability)
    values = np.unique(ordered)
    rates = (len(ordered) - np.searchsorted(ordered, values, side="left")) / len(ordered)
    within = values[rates <= budget]
    if within.size:
        return float(within.min())
    # Even the highest value is shared by more rows than the budget allows: nothing alerts.
    return float(np.nextafter(values[-1], np.inf))


def choose_thresholds(
    probability: np.ndarray,
    y: np.ndarray | None = None,
    *,
    alert_budget: float = ALERT_BUDGET,
    critical_budget: float = CRITICAL_BUDGET,
) -> Thresholds:
    """Alert and Critical by their budgets; with labels, each level's recall beside its rate."""
    if not 0 < critical_budget < alert_budget < 1:
        raise ValueError(
            f"need 0 < critical_budget < alert_budget < 1, got {critical_budget}, {alert_budget}"
        )
    alert = budget_threshold(probability, alert_budget)
    critical = max(budget_threshold(probability, critical_budget), alert)
    if critical == alert:  # ties at the cut-off: Critical starts just above Alert
        critical = float(np.nextafter(alert, np.inf))
    recall_alert = recall_critical = math.nan
    if y is not None and y.sum():
        recall_alert = precision_recall_at(y, probability, alert)[1]
        recall_critical = precision_recall_at(y, probability, critical)[1]
    return Thresholds(
        alert=alert,
        critical=critical,
        rule=(
            f"alert: lowest P with alert rate <= {alert_budget:.0%} of station-days; "
            f"critical: the same for {critical_budget:.0%}"
        ),
        alert_rate=float(np.mean(probability >= alert)),
        alert_recall=recall_alert,
        critical_rate=float(np.mean(probability >= critical)),
        critical_recall=recall_critical,
    )


def score_probability(
    y: np.ndarray, probability: np.ndarray, thresholds: Thresholds, *, climatology: np.ndarray
) -> dict[str, float]:
    """Ranking, calibration and each level's rate, recall and precision on labelled rows.

    ``climatology``: per row, the flood rate the model had to beat (its training years').
    """
    brier = float(brier_score_loss(y, probability)) if len(y) else math.nan
    reference = float(np.mean((climatology - y) ** 2)) if len(y) else math.nan
    p_alert, r_alert = precision_recall_at(y, probability, thresholds.alert)
    p_crit, r_crit = precision_recall_at(y, probability, thresholds.critical)
    flood_rate = float(y.mean()) if len(y) else math.nan
    mean_p = float(probability.mean()) if len(y) else math.nan
    return {
        "pr_auc": _safe(average_precision_score, y, probability),
        "roc_auc": _safe(roc_auc_score, y, probability),
        "brier": brier,
        "bss": 1.0 - brier / reference if reference > 0 else math.nan,
        "mean_p": mean_p,
        "flood_rate": flood_rate,
        "calibration_ratio": mean_p / flood_rate if flood_rate > 0 else math.nan,
        "alert_rate": float(np.mean(probability >= thresholds.alert)),
        "recall_alert": r_alert,
        "precision_alert": p_alert,
        "critical_rate": float(np.mean(probability >= thresholds.critical)),
        "recall_critical": r_crit,
        "precision_critical": p_crit,
    }


def labelled_years(table: pd.DataFrame) -> list[int]:
    years = sorted(int(y) for y in table["year"].unique())
    if len(years) < 2:
        raise DataError(f"time-based evaluation needs at least two labelled years, got {years}")
    return years


def pick_rule(table: pd.DataFrame) -> str:
    """The rain sum that ranks these rows' floods best (ties: the shorter window)."""
    y = table["flood"].to_numpy()
    scores = {name: _safe(average_precision_score, y, table[column].to_numpy())
              for name, column in RULE_SUMS.items()}  # fmt: skip
    # max keeps the first of equal keys, which in window order is the shorter window.
    return max(RULE_SUMS, key=lambda name: np.nan_to_num(scores[name], nan=-1.0))


def evaluate_rule_baseline(table: pd.DataFrame) -> RuleBaseline:
    years = labelled_years(table)
    score = np.full(len(table), np.nan)
    picks = {}
    for test_year in years:
        test = (table["year"] == test_year).to_numpy()
        picks[test_year] = pick_rule(table[~test])
        score[test] = table.loc[test, RULE_SUMS[picks[test_year]]].to_numpy()
    y = table["flood"].to_numpy()
    return RuleBaseline(
        picks=picks,
        final=pick_rule(table),
        pr_auc=_safe(average_precision_score, y, score),
        roc_auc=_safe(roc_auc_score, y, score),
    )


def evaluate_candidate(
    table: pd.DataFrame,
    candidate: Candidate,
    *,
    n_estimators: int = 300,
    seed: int = 0,
    alert_budget: float = ALERT_BUDGET,
    critical_budget: float = CRITICAL_BUDGET,
) -> CandidateEvaluation:
    """Leave-one-labelled-year-out for one candidate; rows must be sorted by date."""
    years = labelled_years(table)
    X, y = table.loc[:, list(FIELD_NAMES)], table["flood"].to_numpy()  # noqa: N806
    oof = np.full(len(table), np.nan)
    climatology = np.full(len(table), np.nan)
    rows, monotone, errors = [], True, []
    for test_year in years:
        test = (table["year"] == test_year).to_numpy()
        if y[~test].sum() == 0:
            raise DataError(f"no flood in the training part for test year {test_year}")
        try:
            fitted: Pipeline = candidate.build(n_estimators=n_estimators, seed=seed).fit(X[~test], y[~test])
        except Exception as exc:  # a family that cannot fit this fold is out of the race, not a crash
            logger.warning("%s could not be fitted without %s: %s", candidate.name, test_year, exc)
            errors.append(f"{test_year}: {exc}")
            continue
        monotone = monotone and rain_monotone(fitted)
        fold_thresholds = choose_thresholds(
            fitted.predict_proba(X[~test])[:, 1], alert_budget=alert_budget, critical_budget=critical_budget
        )
        probability = fitted.predict_proba(X[test])[:, 1]
        oof[test] = probability
        climatology[test] = y[~test].mean()
        scores = score_probability(y[test], probability, fold_thresholds, climatology=climatology[test])
        rows.append(
            {
                "candidate": candidate.name,
                "test_year": test_year,
                "rows": int(test.sum()),
                "flood_rows": int(y[test].sum()),
                "flood_days": int(table.loc[test & (y == 1), "date"].nunique()),
                "alert_threshold": fold_thresholds.alert,
                "critical_threshold": fold_thresholds.critical,
                **scores,
            }
        )
    seen = ~np.isnan(oof)
    if not seen.any():
        raise CandidateUnfit(f"{candidate.name} could not be fitted in any fold: {'; '.join(errors)}")
    thresholds = choose_thresholds(
        oof[seen], y[seen], alert_budget=alert_budget, critical_budget=critical_budget
    )
    pooled = score_probability(y[seen], oof[seen], thresholds, climatology=climatology[seen])
    return CandidateEvaluation(
        candidate=candidate,
        per_year=pd.DataFrame(rows),
        oof_probability=oof,
        thresholds=thresholds,
        metrics=pooled,
        monotone=monotone,
        complete=not errors,
        error="; ".join(errors),
    )
