"""Build-time pieces: ONNX compilation and its agreement gate, imports into the BentoML store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.errors import ConfigurationError, ModelIntegrityError
from core.observation import INPUT_FIELDS
from serving.bentos import pinned_model_tag
from serving.compiled import AGREEMENT_TOLERANCE, CompiledForest, check_agreement, compile_forest
from serving.model_store import bento_model_tag, import_model, read_model, sample_observations
from serving.predictor import (
    COMPILED_REPORT_FILE,
    ONNX_FILE,
    PIPELINE_FILE,
    Predictor,
    ServedModel,
    engine_for,
)


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


def test_stored_model_carries_registry_labels_and_a_verified_onnx(
    served_model: tuple[ServedModel, Path],
) -> None:
    served, model_dir = served_model
    assert served.bento_model_tag == bento_model_tag(served)
    assert served.bento_model_tag.startswith(f"{served.name}:v{served.version}-")
    assert served.run_id and served.data_source == "synthetic"
    assert 0.0 < served.thresholds.alert < served.thresholds.critical <= 1.0
    report = json.loads((model_dir / COMPILED_REPORT_FILE).read_text())
    assert report["agrees"] and report["max_abs_diff"] <= AGREEMENT_TOLERANCE
    assert engine_for(model_dir) == "onnxruntime"


def test_predictor_falls_back_to_sklearn_when_onnx_is_altered(
    served_model: tuple[ServedModel, Path], tmp_path: Path
) -> None:
    served, model_dir = served_model
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    reference = Predictor.from_model_dir(copy, expected_sha256=served.pipeline_sha256)
    rows = sample_observations(200, seed=5)
    expected = reference.predict_proba(rows)

    (copy / ONNX_FILE).write_bytes((copy / ONNX_FILE).read_bytes() + b"\0")
    assert engine_for(copy) == "sklearn"
    fallback = Predictor.from_model_dir(copy, expected_sha256=served.pipeline_sha256)
    np.testing.assert_allclose(fallback.predict_proba(rows), expected, atol=AGREEMENT_TOLERANCE)


def test_predictor_refuses_a_pipeline_that_is_not_the_pinned_one(
    served_model: tuple[ServedModel, Path],
) -> None:
    _, model_dir = served_model
    with pytest.raises(ModelIntegrityError, match="does not match"):
        Predictor.from_model_dir(model_dir, expected_sha256="0" * 64)


def test_import_is_idempotent_and_refuses_a_changed_file(
    served_model: tuple[ServedModel, Path], tmp_path: Path
) -> None:
    served, model_dir = served_model
    store = tmp_path / "models"
    tag = import_model(served, model_dir / PIPELINE_FILE, store_dir=store)
    assert import_model(served, model_dir / PIPELINE_FILE, store_dir=store) == tag
    again, _ = read_model(tag, store_dir=store)
    assert again.version == served.version and again.thresholds == served.thresholds

    tampered = tmp_path / "tampered.skops"
    tampered.write_bytes((model_dir / PIPELINE_FILE).read_bytes() + b"x")
    with pytest.raises(ModelIntegrityError):
        import_model(served, tampered, store_dir=tmp_path / "other")


@pytest.mark.parametrize("tag", ["", "flood-risk", "flood-risk:latest"])
def test_service_refuses_an_unpinned_model_tag(tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from bentoml._internal.utils.args import set_arguments

    set_arguments({"model_tag": tag})
    try:
        with pytest.raises(ConfigurationError, match="does not pin"):
            pinned_model_tag()
    finally:
        set_arguments({})
