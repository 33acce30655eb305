"""Evaluation figures written as PNGs for the MLflow run and ``FLOOD_HOME/reports``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless machines; must precede pyplot

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.calibration import calibration_curve
from sklearn.metrics import precision_recall_curve

from core.risk import Thresholds

LEVEL_COLOURS = {"Alert": "tab:orange", "Critical": "tab:red"}


def plot_leaderboard(leaderboard: pd.DataFrame, *, rule_pr_auc: float, path: Path) -> Path:
    """Pooled out-of-year PR-AUC and recall at Alert per candidate; the winner highlighted."""
    frame = leaderboard.iloc[::-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.5 * len(frame) + 1.8), sharey=True)
    colours = ["tab:green" if w else ("tab:blue" if e else "lightgrey")
               for w, e in zip(frame["winner"], frame["eligible"], strict=True)]  # fmt: skip
    left.barh(frame["candidate"], frame["pr_auc"], color=colours)
    left.axvline(
        rule_pr_auc, color="black", linestyle="--", label=f"rule the training years pick ({rule_pr_auc:.3f})"
    )
    # Scaled to the data: PR-AUCs near the flood rate would be slivers on a 0-1 axis.
    left.set(
        xlabel="PR-AUC (pooled out-of-year)",
        xlim=(0, min(1.0, 1.25 * max(frame["pr_auc"].max(), rule_pr_auc))),
    )
    left.legend(loc="lower right", fontsize=8)
    right.barh(frame["candidate"], frame["recall_alert"], color=colours)
    right.set(xlabel="recall at Alert (pooled out-of-year)", xlim=(0, 1))
    fig.suptitle("Candidates (green: winner, grey: ineligible)")
    return _save(fig, path)


def plot_precision_recall(
    y: np.ndarray, probabilities: dict[str, np.ndarray], *, winner: str, path: Path
) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, probability in probabilities.items():
        precision, recall, _ = precision_recall_curve(y, probability)
        style: dict[str, Any] = {"linewidth": 2.5} if name == winner else {"linewidth": 1, "alpha": 0.6}
        ax.step(
            recall, precision, where="post", label=name + (" (winner)" if name == winner else ""), **style
        )
    ax.axhline(y.mean(), color="grey", linestyle=":", label=f"chance ({y.mean():.3f})")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall on held-out years",
           xlim=(0, 1), ylim=(0, 1.02))  # fmt: skip
    ax.legend(loc="upper right", fontsize=7)
    return _save(fig, path)


def plot_calibration(y: np.ndarray, probability: np.ndarray, thresholds: Thresholds, path: Path) -> Path:
    """Reliability: observed flood rate against predicted P, on held-out years."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    bins = max(2, min(10, int(y.sum())))
    observed, predicted = calibration_curve(y, probability, n_bins=bins, strategy="quantile")
    top = 1.1 * max(0.05, float(predicted.max()), float(observed.max()), thresholds.critical)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    ax.plot(predicted, observed, marker="o", label="winner (out-of-year, quantile bins)")
    for value, name in ((thresholds.alert, "Alert"), (thresholds.critical, "Critical")):
        ax.axvline(value, linestyle="--", color=LEVEL_COLOURS[name], label=f"{name} >= {value:.3f}")
    ax.set(xlabel="predicted P(flood)", ylabel="observed flood rate", title="Reliability",
           xlim=(0, min(1.0, top)), ylim=(0, min(1.02, top)))  # fmt: skip
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
