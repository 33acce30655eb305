"""Evaluation figures written as PNGs for the MLflow run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless machines; must precede pyplot

import matplotlib.pyplot as plt
import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import precision_recall_curve

from core.features import FEATURE_NAMES
from training.result import Thresholds


def plot_precision_recall(y: np.ndarray, probability: np.ndarray, rainfall: np.ndarray, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, score in (("forest (out-of-year)", probability), ("rainfall baseline", rainfall)):
        precision, recall, _ = precision_recall_curve(y, score)
        ax.step(recall, precision, where="post", label=label)
    ax.axhline(y.mean(), color="grey", linestyle=":", label=f"chance ({y.mean():.3f})")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall on held-out years",
           xlim=(0, 1), ylim=(0, 1.02))  # fmt: skip
    ax.legend(loc="upper right")
    return _save(fig, path)


def plot_calibration(y: np.ndarray, probability: np.ndarray, thresholds: Thresholds, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    bins = max(2, min(10, int(y.sum())))
    observed, predicted = calibration_curve(y, probability, n_bins=bins, strategy="quantile")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    ax.plot(predicted, observed, marker="o", label="forest (out-of-year)")
    for value, name in ((thresholds.alert, "Alert"), (thresholds.critical, "Critical")):
        ax.axvline(value, linestyle="--", alpha=0.5, label=f"{name} >= {value:.2f}")
    ax.set(xlabel="predicted P(flood)", ylabel="observed flood rate", title="Calibration",
           xlim=(0, 1), ylim=(0, 1.02))  # fmt: skip
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_feature_importance(importances: np.ndarray, path: Path) -> Path:
    order = np.argsort(importances)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.barh(np.asarray(FEATURE_NAMES)[order], importances[order])
    ax.set(xlabel="mean decrease in impurity", title="Feature importance (final forest)")
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
