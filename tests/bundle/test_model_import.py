"""Registry versions imported into the BentoML store: labels, the verified ONNX, idempotence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bundle.model_import import bento_model_tag, import_model
from bundle.onnx import AGREEMENT_TOLERANCE
from core.errors import ModelIntegrityError
from serving.model_store import read_model
from serving.predictor import COMPILED_REPORT_FILE, PIPELINE_FILE, ServedModel, engine_for


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
