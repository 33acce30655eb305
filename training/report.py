"""The per-year report people read: model beside the rainfall baseline, in Markdown."""

from __future__ import annotations

import math

from training.result import TrainingResult

_COLUMNS = (
    ("test year", "test_year", "d"),
    ("flood days / rows", None, ""),
    ("PR-AUC model", "model_pr_auc", ".3f"),
    ("PR-AUC rain", "baseline_pr_auc", ".3f"),
    ("ROC-AUC model", "model_roc_auc", ".3f"),
    ("ROC-AUC rain", "baseline_roc_auc", ".3f"),
    ("Brier", "model_brier", ".4f"),
    ("recall@Alert", "model_recall_alert", ".2f"),
    ("prec@Alert", "model_precision_alert", ".3f"),
    ("recall@Critical", "model_recall_critical", ".2f"),
    ("prec@Critical", "model_precision_critical", ".3f"),
    ("rain cut-off mm", "baseline_cutoff_mm", ".1f"),
    ("recall rain", "baseline_recall", ".2f"),
    ("prec rain", "baseline_precision", ".3f"),
)


def _cell(value: object, fmt: str) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return format(value, fmt) if fmt else str(value)


def render_report(result: TrainingResult) -> str:
    header = "| " + " | ".join(name for name, _, _ in _COLUMNS) + " |"
    lines = [header, "|" + "---|" * len(_COLUMNS)]
    for row in result.per_year.to_dict("records"):
        cells = [
            f"{row['flood_days']} / {row['flood_rows']}" if key is None else _cell(row[key], fmt)
            for _, key, fmt in _COLUMNS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    m, t = result.metrics, result.thresholds
    return "\n".join(
        [
            f"## Flood model evaluation ({result.data_source} data)",
            "",
            "Time-based: each labelled year is scored by a model trained on the other years, at",
            "thresholds chosen without it. Rain = the best single daily-rainfall cut-off on the",
            "training part (its ranking score is the day's rainfall).",
            "",
            *lines,
            "",
            f"Pooled out-of-year: PR-AUC {m['oof_pr_auc']:.3f} vs rain {m['baseline_oof_pr_auc']:.3f}"
            f" (chance {m['prevalence']:.3f}); ROC-AUC {m['oof_roc_auc']:.3f} vs rain"
            f" {m['baseline_oof_roc_auc']:.3f}; recall@Alert {m['oof_recall_alert']:.2f}.",
            f"Serving thresholds: Alert >= {t.alert:.4f}, Critical >= {t.critical:.4f} ({t.rule}).",
            f"Validation: {'passed' if result.validation_passed else 'FAILED'}: {result.validation_reason}.",
        ]
    )
