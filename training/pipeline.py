"""One training run: every candidate through one protocol, the written rule picks, the
winner is refitted on every labelled year, figures are drawn."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import DataError
from core.observation import FIELD_NAMES
from training.budget import ALERT_BUDGET, CRITICAL_BUDGET
from training.data import Dataset
from training.evaluation import (
    CandidateEvaluation,
    CandidateUnfit,
    StepCallback,
    evaluate_candidate,
    evaluate_rule_baseline,
)
from training.model import CANDIDATES, Candidate
from training.plots import plot_calibration, plot_leaderboard, plot_precision_recall
from training.report import render_report
from training.result import TrainingResult
from training.selection import Standing, judge_validation, select_candidate

logger = logging.getLogger(__name__)

# Pooled out-of-year metrics of each candidate, as the leaderboard and MLflow show them.
LEADERBOARD_METRICS = (
    "pr_auc",
    "roc_auc",
    "brier",
    "bss",
    "calibration_ratio",
    "alert_rate",
    "recall_alert",
    "precision_alert",
    "critical_rate",
    "recall_critical",
)


def leaderboard_table(evaluations: list[CandidateEvaluation], *, winner: str) -> pd.DataFrame:
    rows = []
    for ev in evaluations:
        problems = ev.standing().problems
        rows.append(
            {
                "candidate": ev.candidate.name,
                "complexity": ev.candidate.complexity,
                **{k: ev.metrics[k] for k in LEADERBOARD_METRICS},
                "alert_threshold": ev.thresholds.alert,
                "critical_threshold": ev.thresholds.critical,
                "eligible": not problems,
                "note": "; ".join(problems),
                "winner": ev.candidate.name == winner,
            }
        )
    return (
        pd.DataFrame(rows).sort_values("pr_auc", ascending=False, na_position="last").reset_index(drop=True)
    )


def train_model(
    dataset: Dataset,
    *,
    n_estimators: int = 300,
    seed: int = 0,
    reports_dir: Path | None = None,
    on_step: StepCallback | None = None,
    alert_budget: float = ALERT_BUDGET,
    critical_budget: float = CRITICAL_BUDGET,
    candidates: tuple[Candidate, ...] = CANDIDATES,
) -> TrainingResult:
    table = dataset.table.sort_values(["date", "station"]).reset_index(drop=True)
    params = {
        "n_estimators": n_estimators,
        "seed": seed,
        "data_source": dataset.data_source,
        "years": ",".join(str(y) for y in dataset.years),
        "rows": len(table),
        "flood_rows": int(table["flood"].sum()),
        "flood_days": int(table.loc[table["flood"] == 1, "date"].nunique()),
        "stations": ",".join(sorted(table["station"].unique())),
        "alert_budget": alert_budget,
        "critical_budget": critical_budget,
        "candidates": ",".join(c.name for c in candidates),
    }
    logger.info("training on %s data: %s", dataset.data_source, params)

    evaluations = []
    for candidate in candidates:
        if on_step:
            on_step(f"{candidate.name}: leave one labelled year out")
        try:
            evaluations.append(
                evaluate_candidate(
                    table,
                    candidate,
                    n_estimators=n_estimators,
                    seed=seed,
                    alert_budget=alert_budget,
                    critical_budget=critical_budget,
                )
            )
        except CandidateUnfit as exc:
            logger.warning("candidate %s dropped: %s", candidate.name, exc)
    if not evaluations:
        raise DataError("no candidate could be fitted")
    by_name = {ev.candidate.name: ev for ev in evaluations}
    rule = evaluate_rule_baseline(table)
    prevalence = float(table["flood"].mean())

    def gate(standing: Standing) -> tuple[bool, str]:
        return judge_validation(
            standing,
            is_picked_rule=standing.name == rule.final,
            rule_name=rule.final,
            rule_pr_auc=rule.pr_auc,
            prevalence=prevalence,
        )

    try:
        selection = select_candidate([ev.standing() for ev in evaluations], gate=gate)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    winner = by_name[selection.winner]
    passed, reason = gate(winner.standing())
    logger.info("%s; validation %s", selection.explanation, "passed" if passed else "FAILED")

    if on_step:
        on_step(f"fit {winner.candidate.name} on every labelled year")
    X, y = table.loc[:, list(FIELD_NAMES)], table["flood"].to_numpy()  # noqa: N806
    pipeline = winner.candidate.build(n_estimators=n_estimators, seed=seed).fit(X, y)
    params["candidate"] = winner.candidate.name

    metrics: dict[str, float] = {
        "prevalence": prevalence,
        **{f"oof_{k}": v for k, v in winner.metrics.items()},
        "rule_oof_pr_auc": rule.pr_auc,
        "rule_oof_roc_auc": rule.roc_auc,
        "selection_margin_pr_auc": selection.margin,
    }
    for row in winner.per_year.to_dict("records"):
        for key in ("pr_auc", "roc_auc", "brier", "bss", "alert_rate", "recall_alert", "recall_critical"):
            metrics[f"test_{row['test_year']}_{key}"] = float(row[key])

    if on_step:
        on_step("draw figures")
    out = reports_dir or Path(tempfile.mkdtemp(prefix="flood-report-"))
    seen = ~np.isnan(winner.oof_probability)
    leaderboard = leaderboard_table(evaluations, winner=winner.candidate.name)
    plots = {
        "leaderboard": plot_leaderboard(leaderboard, rule_pr_auc=rule.pr_auc, path=out / "leaderboard.png"),
        "precision_recall": plot_precision_recall(
            y[seen],
            {name: ev.oof_probability[seen] for name, ev in by_name.items()},
            winner=winner.candidate.name,
            path=out / "precision_recall.png",
        ),
        "calibration": plot_calibration(
            y[seen], winner.oof_probability[seen], winner.thresholds, out / "calibration.png"
        ),
    }
    result = TrainingResult(
        pipeline=pipeline,
        thresholds=winner.thresholds,
        data_source=dataset.data_source,
        params=params,
        metrics=metrics,
        per_year=pd.concat([ev.per_year for ev in evaluations], ignore_index=True),
        validation_passed=passed,
        validation_reason=reason,
        file_sha256=dict(dataset.file_sha256),
        plots=plots,
        input_example=pd.DataFrame(X.head(3)).reset_index(drop=True),
        candidate=winner.candidate.name,
        leaderboard=leaderboard,
        selection=selection.explanation
        + (f"; ineligible: {selection.ineligible}" if selection.ineligible else "")
        + f"; the training years pick {rule.final} (picks per test year: {rule.picks})",
    )
    result.report_markdown = render_report(result, reports_dir=out)
    return result
