"""Checksums over model directories and the skops type allowlist."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skops.io as sio
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.pipeline import Pipeline

from core.errors import ModelIntegrityError
from registry.integrity import load_pipeline_file, save_pipeline, sha256_tree
from tests.registry.training_results import labelled, sample_inputs


class SmuggledStep(TransformerMixin, BaseEstimator):
    """A type no flood pipeline contains: loading it would run code we did not vet."""

    def fit(self, X: object, y: object = None) -> SmuggledStep:  # noqa: N803
        return self

    def transform(self, X: object) -> object:  # noqa: N803
        return X


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def test_sha256_tree_covers_paths_and_bytes(tmp_path: Path) -> None:
    files = {"MLmodel": b"flavors: {}\n", "artifacts/pipeline.skops": b"\x00\x01\x02"}
    digest = sha256_tree(_tree(tmp_path / "a", files))
    assert sha256_tree(_tree(tmp_path / "b", files)) == digest
    assert sha256_tree(_tree(tmp_path / "c", {**files, "MLmodel": b"flavors: {}\r"})) != digest
    moved = {"MLmodel": files["MLmodel"], "pipeline.skops": files["artifacts/pipeline.skops"]}
    assert sha256_tree(_tree(tmp_path / "d", moved)) != digest
    extra = {**files, "notes.txt": b""}
    assert sha256_tree(_tree(tmp_path / "e", extra)) != digest
    # MLflow writes this into a local store whenever the model is read through an alias.
    bookkeeping = {**files, "registered_model_meta": b"model_name: flood-risk\n"}
    assert sha256_tree(_tree(tmp_path / "f", bookkeeping)) == digest
    nested = {**files, "artifacts/registered_model_meta": b""}
    assert sha256_tree(_tree(tmp_path / "g", nested)) != digest
    with pytest.raises(ModelIntegrityError):
        sha256_tree(tmp_path / "missing")


def test_pipeline_round_trips_through_trusted_skops_load(tmp_path: Path) -> None:
    pipeline = labelled().pipeline
    path = save_pipeline(pipeline, tmp_path / "pipeline.skops")
    loaded = load_pipeline_file(path)
    frame = sample_inputs()
    np.testing.assert_allclose(loaded.predict_proba(frame), pipeline.predict_proba(frame))


def test_type_outside_allowlist_is_refused(tmp_path: Path) -> None:
    fitted = labelled().pipeline
    smuggling = Pipeline([("smuggled", SmuggledStep()), *fitted.steps])
    path = tmp_path / "pipeline.skops"
    sio.dump(smuggling, path)
    with pytest.raises(ModelIntegrityError, match="SmuggledStep"):
        load_pipeline_file(path)
    with pytest.raises(ModelIntegrityError, match="untrusted types"):
        save_pipeline(smuggling, tmp_path / "again.skops")


def test_damaged_pipeline_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.skops"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelIntegrityError):
        load_pipeline_file(path)


def test_numeric_frame_converts_integers_and_refuses_the_rest() -> None:
    from core.errors import DataError
    from registry.pyfunc import numeric_frame

    frame = numeric_frame(pd.DataFrame({"temperature": [28], "humidity": [85], "rainfall": [5]}))
    assert list(frame.dtypes.unique()) == [np.dtype(np.float64)]
    assert frame.loc[0, "rainfall"] == 5.0
    base = {"temperature": [28], "humidity": [85], "rainfall": [5]}
    with pytest.raises(DataError, match=r"unknown input columns \['rain'\]"):
        numeric_frame(pd.DataFrame({**base, "rain": [3]}))
    with pytest.raises(DataError, match=r"missing required input columns \['humidity'\]"):
        numeric_frame(pd.DataFrame({"temperature": [28], "rainfall": [5]}))
    with pytest.raises(DataError, match="'month' must hold numbers"):
        numeric_frame(pd.DataFrame({**base, "month": [True]}))
