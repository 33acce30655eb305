"""The forest compiled to ONNX and its agreement gate against sklearn."""

from __future__ import annotations

import numpy as np

from bundle.onnx import AGREEMENT_TOLERANCE, check_agreement, compile_forest, sample_observations
from core.observation import INPUT_FIELDS
from serving.compiled import CompiledForest
from serving.predictor import Predictor


def test_sampled_observations_are_valid_inputs() -> None:
    raw = sample_observations(500, seed=3)
    for i, spec in enumerate(INPUT_FIELDS):
        column = raw[:, i]
        present = column[~np.isnan(column)]
        assert present.min() >= spec.minimum and present.max() <= spec.maximum, spec.name
        assert spec.required == (present.size == column.size), spec.name
    names = [f.name for f in INPUT_FIELDS]
    rain, rain3 = raw[:, names.index("rainfall")], raw[:, names.index("rainfall_3d")]
    known = ~np.isnan(rain3)
    assert np.all(rain3[known] >= rain[known])


def test_compiled_forest_agrees_with_sklearn_on_held_out_rows(predictor: Predictor) -> None:
    pipeline = predictor._pipeline
    compiled = CompiledForest(compile_forest(pipeline))
    report = check_agreement(pipeline, compiled, sample_observations(3000, seed=11))
    assert report.rows == 3000
    assert report.agrees, report
    assert report.max_abs_diff <= AGREEMENT_TOLERANCE
