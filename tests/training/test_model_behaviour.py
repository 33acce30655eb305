"""Behavioural tests (Made-With-ML style): properties any sane flood model must have."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.observation import FIELD_NAMES
from training.data import load_dataset
from training.model import build_pipeline
from training.result import TrainingResult

RAIN_GRID = np.array([0, 1, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500])


def grid_rows() -> list[dict[str, float]]:
    rows = []
    for temperature, humidity, month, antecedent in itertools.product(
        (24, 28, 33), (60, 85, 98), (None, 2, 8), (0, 40, 150)
    ):
        for rain in RAIN_GRID:
            row: dict[str, float] = {"temperature": temperature, "humidity": humidity, "rainfall": rain}
            if month is not None:
                row["month"] = month
            if antecedent:
                row["rainfall_3d"] = rain + antecedent
                row["rainfall_7d"] = rain + 2 * antecedent
            rows.append(row)
    return rows


def assert_more_rain_never_lowers_risk(pipeline: object) -> None:
    frame = pd.DataFrame(grid_rows(), columns=list(FIELD_NAMES))
    probability = pipeline.predict_proba(frame)[:, 1]  # type: ignore[attr-defined]
    curves = probability.reshape(-1, len(RAIN_GRID))
    assert np.all(np.diff(curves, axis=1) >= -1e-12), "P(flood) fell as rainfall rose"
    # and the property is not vacuous: rain does move the risk somewhere on the grid
    assert np.ptp(curves, axis=1).max() > 0.1


def test_more_rain_never_lowers_risk_synthetic(synthetic_result: TrainingResult) -> None:
    assert_more_rain_never_lowers_risk(synthetic_result.pipeline)


def test_more_rain_never_lowers_risk_real(real_data_dir: Path) -> None:
    table = load_dataset(real_data_dir).table
    pipeline = build_pipeline(n_estimators=60).fit(table.loc[:, list(FIELD_NAMES)], table["flood"])
    assert_more_rain_never_lowers_risk(pipeline)


def test_more_antecedent_rain_never_lowers_risk(synthetic_result: TrainingResult) -> None:
    base = {"temperature": 28, "humidity": 85, "rainfall": 30}
    rows = [{**base, "rainfall_3d": 30 + a, "rainfall_7d": 30 + a} for a in (0, 10, 30, 60, 120, 250)]
    probability = synthetic_result.pipeline.predict_proba(pd.DataFrame(rows))[:, 1]
    assert np.all(np.diff(probability) >= -1e-12)


def test_dry_day_is_safer_than_a_deluge(synthetic_result: TrainingResult) -> None:
    rows = [
        {"temperature": 31, "humidity": 60, "rainfall": 0, "rainfall_3d": 0, "rainfall_7d": 0, "month": 3},
        {
            "temperature": 26,
            "humidity": 97,
            "rainfall": 180,
            "rainfall_3d": 260,
            "rainfall_7d": 300,
            "month": 8,
        },
    ]
    dry, deluge = synthetic_result.pipeline.predict_proba(pd.DataFrame(rows))[:, 1]
    assert deluge > dry
    assert synthetic_result.thresholds.risk_level(dry) == "Safe"
    assert synthetic_result.thresholds.risk_level(deluge) != "Safe"


def test_optional_fields_may_be_absent(synthetic_result: TrainingResult) -> None:
    only_required = pd.DataFrame([{"temperature": 28, "humidity": 85, "rainfall": 50}])
    probability = synthetic_result.pipeline.predict_proba(only_required)[:, 1]
    assert probability.shape == (1,) and 0.0 <= probability[0] <= 1.0


def test_forest_is_single_threaded(synthetic_result: TrainingResult) -> None:
    assert synthetic_result.pipeline.named_steps["model"].n_jobs == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_training_is_reproducible(seed: int) -> None:
    from training.synthetic import generate_dataset

    table = generate_dataset(seed=1).table
    X, y = table.loc[:, list(FIELD_NAMES)], table["flood"]  # noqa: N806
    a = build_pipeline(n_estimators=20, seed=seed).fit(X, y).predict_proba(X)[:, 1]
    b = build_pipeline(n_estimators=20, seed=seed).fit(X, y).predict_proba(X)[:, 1]
    assert np.array_equal(a, b)
