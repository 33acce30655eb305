"""One training run: evaluate by year, fit the final model, draw the figures."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.pipeline import Pipeline

from core.observation import FIELD_NAMES
from training.data import Dataset
from training.evaluation import StepCallback, evaluate_by_year
from training.model import build_pipeline
from training.plots import plot_calibration, plot_feature_importance, plot_precision_recall
from training.report import render_report
from training.result import TrainingResult

logger = logging.getLogger(__name__)


def train_model(
    dataset: Dataset,
    *,
    n_estimators: int = 300,
    seed: int = 0,
    reports_dir: Path | None = None,
    on_step: StepCallback | None = None,
) -> TrainingResult:
    table = dataset.table
    params = {
        "n_estimators": n_estimators,
        "seed": seed,
        "data_source": dataset.data_source,
        "years": ",".join(str(y) for y in dataset.years),
        "rows": len(table),
        "flood_rows": int(table["flood"].sum()),
        "flood_days": int(table.loc[table["flood"] == 1, "date"].nunique()),
        "stations": ",".join(sorted(table["station"].unique())),
    }
    logger.info("training on %s data: %s", dataset.data_source, params)

    def make_pipeline() -> Pipeline:
        return build_pipeline(n_estimators=n_estimators, seed=seed)

    evaluation = evaluate_by_year(table, make_pipeline, on_step=on_step)

    if on_step:
        on_step("fit the final model on every labelled year")
    X, y = table.loc[:, list(FIELD_NAMES)], table["flood"].to_numpy()  # noqa: N806
    pipeline = make_pipeline().fit(X, y)
    params.update({f"model_{k}": v for k, v in pipeline.named_steps["model"].get_params().items()
                   if k in ("min_samples_leaf", "max_features", "class_weight", "n_jobs")})  # fmt: skip

    if on_step:
        on_step("draw figures")
    out = reports_dir or Path(tempfile.mkdtemp(prefix="flood-report-"))
    seen = ~np.isnan(evaluation.oof_probability)
    y_seen, p_seen = y[seen], evaluation.oof_probability[seen]
    plots = {
        "precision_recall": plot_precision_recall(
            y_seen, p_seen, table["rainfall"].to_numpy()[seen], out / "precision_recall.png"
        ),
        "calibration": plot_calibration(y_seen, p_seen, evaluation.thresholds, out / "calibration.png"),
        "feature_importance": plot_feature_importance(
            pipeline.named_steps["model"].feature_importances_, out / "feature_importance.png"
        ),
    }
    result = TrainingResult(
        pipeline=pipeline,
        thresholds=evaluation.thresholds,
        data_source=dataset.data_source,
        params=params,
        metrics=evaluation.metrics,
        per_year=evaluation.per_year,
        validation_passed=evaluation.validation_passed,
        validation_reason=evaluation.validation_reason,
        file_sha256=dict(dataset.file_sha256),
        plots=plots,
        input_example=pd.DataFrame(X.head(3)).reset_index(drop=True),
    )
    result.report_markdown = render_report(result)
    return result
