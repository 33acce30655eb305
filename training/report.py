"""The report people read: the leaderboard, the winner per year, thresholds and validation."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from training.result import TrainingResult

LEADERBOARD_COLUMNS = (
    ("candidate", "candidate", ""),
    ("PR-AUC", "pr_auc", ".3f"),
    ("ROC-AUC", "roc_auc", ".3f"),
    ("Brier", "brier", ".4f"),
    ("BSS", "bss", ".3f"),
    ("mean P / rate", "calibration_ratio", ".2f"),
    ("alert rate", "alert_rate", ".3f"),
    ("recall@Alert", "recall_alert", ".2f"),
    ("recall@Critical", "recall_critical", ".2f"),
    ("eligible", "eligible", ""),
)
PER_YEAR_COLUMNS = (
    ("candidate", "candidate", ""),
    ("test year", "test_year", "d"),
    ("flood days / rows", None, ""),
    ("PR-AUC", "pr_auc", ".3f"),
    ("ROC-AUC", "roc_auc", ".3f"),
    ("Brier", "brier", ".4f"),
    ("BSS", "bss", ".3f"),
    ("alert rate", "alert_rate", ".3f"),
    ("recall@Alert", "recall_alert", ".2f"),
    ("recall@Critical", "recall_critical", ".2f"),
)


def _cell(value: object, fmt: str) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, fmt) if fmt else str(value)


def markdown_table(frame: pd.DataFrame, columns: tuple[tuple[str, str | None, str], ...]) -> list[str]:
    lines = ["| " + " | ".join(name for name, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in frame.to_dict("records"):
        cells = [
            f"{row['flood_days']} / {row['flood_rows']}" if key is None else _cell(row[key], fmt)
            for _, key, fmt in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_report(result: TrainingResult, *, reports_dir: Path | None = None) -> str:
    m, t = result.metrics, result.thresholds
    beats = m["oof_pr_auc"] > m["rule_oof_pr_auc"]
    where = [f"Figures: {reports_dir}/ (and the MLflow run's plots/)."] if reports_dir else []
    return "\n".join(
        [
            f"## Flood model candidates ({result.data_source} data)",
            "",
            "Each candidate is fitted and calibrated on all but one labelled year and scored on",
            "that year; pooled below, per year further down. Alert and Critical are read off each",
            "candidate's pooled out-of-year P by the alert budgets.",
            "",
            *markdown_table(result.leaderboard, LEADERBOARD_COLUMNS),
            "",
            f"Selection (training/selection.py, amendment 1 included): {result.selection}.",
            f"Beats the rule the training years pick (pooled PR-AUC {m['rule_oof_pr_auc']:.3f}): "
            f"{'yes' if beats else 'no'}.",
            "",
            "### Every candidate per test year",
            "",
            *markdown_table(result.per_year, PER_YEAR_COLUMNS),
            "",
            f"Serving {result.candidate}: Alert >= {t.alert:.4f} (out of year: alert rate "
            f"{t.alert_rate:.3f}, recall {t.alert_recall:.2f}), Critical >= {t.critical:.4f} "
            f"(alert rate {t.critical_rate:.3f}, recall {t.critical_recall:.2f}); {t.rule}.",
            f"Flood rate {m['prevalence']:.4f}; mean out-of-year P {m['oof_mean_p']:.4f} "
            f"({m['oof_calibration_ratio']:.2f}x); Brier skill vs climatology {m['oof_bss']:.3f}.",
            f"Validation: {'passed' if result.validation_passed else 'FAILED'}: {result.validation_reason}.",
            *where,
        ]
    )
