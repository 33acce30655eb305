"""The stored model at run time: the predictor over its files, the pinned model tag."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import bentoml
import numpy as np
import pytest

from bundle.onnx import AGREEMENT_TOLERANCE, sample_observations
from core.errors import ConfigurationError, ModelIntegrityError
from serving.model_store import pinned_model_tag
from serving.predictor import ONNX_FILE, Predictor, ServedModel, engine_for


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


@pytest.mark.parametrize("tag", ["", "flood-risk", "flood-risk:latest"])
def test_service_refuses_an_unpinned_model_tag(tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The Bento's arguments as `bentoml serve` hands them over; BentoML has no public setter.
    monkeypatch.setattr(bentoml, "use_arguments", lambda: SimpleNamespace(model_tag=tag))
    with pytest.raises(ConfigurationError, match="does not pin"):
        pinned_model_tag()
