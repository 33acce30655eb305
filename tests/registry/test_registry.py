"""Registry round trips on SQLite and PostgreSQL: log, register, promote, load, roll back."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

import registry
from core.errors import ModelIntegrityError, PromotionRefused, RegistryError
from core.settings import Settings
from registry.integrity import pipeline_path
from registry.runs import data_sha256_tag
from tests.registry.conftest import BACKENDS
from tests.registry.training_results import labelled, sample_inputs


def _flood_probability(pipeline: object, frame: object) -> np.ndarray:
    return np.asarray(pipeline.predict_proba(frame)[:, 1])  # type: ignore[attr-defined]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_log_and_register_record_run_and_version(backend: Settings) -> None:
    result = labelled(seed=0)
    info = registry.log_training_run(result)

    assert info.name == backend.flood_model_name
    assert info.version == 1
    assert info.data_source == "real"
    assert info.validation_status == "passed"
    # Thresholds.as_tags keeps six decimals.
    assert info.thresholds.alert == pytest.approx(result.thresholds.alert, abs=1e-6)
    assert info.thresholds.critical == pytest.approx(result.thresholds.critical, abs=1e-6)
    assert info.thresholds.rule == result.thresholds.rule
    assert info.metrics == pytest.approx(result.metrics, nan_ok=True)
    assert len(info.model_sha256) == 64
    assert info.source.startswith("models:/m-")
    assert info.aliases == []

    client = mlflow.MlflowClient(tracking_uri=backend.tracking_uri)
    run = client.get_run(info.run_id)
    assert run.data.params["n_estimators"] == str(result.params["n_estimators"])
    assert run.data.tags["validation_status"] == "passed"
    for name, digest in result.file_sha256.items():
        assert run.data.tags[data_sha256_tag(name)] == digest
    logged = {a.path for a in client.list_artifacts(info.run_id)}
    assert {"per_year.csv", "per_year.md", "per_year.json", "report.md", "plots"} <= logged
    plots = {Path(a.path).name for a in client.list_artifacts(info.run_id, "plots")}
    assert plots == {p.name for p in result.plots.values()}

    # Artifacts land under FLOOD_HOME's artifact root, not in MLflow's default ./mlruns.
    experiment = client.get_experiment_by_name(backend.flood_experiment)
    assert experiment is not None
    assert experiment.artifact_location == backend.artifact_root.as_uri()
    assert any(backend.artifact_root.glob("models/m-*/artifacts/artifacts/pipeline.skops"))

    second = registry.log_training_run(labelled(seed=1))
    assert [v.version for v in registry.list_versions()] == [1, second.version] == [1, 2]
    assert second.model_sha256 != info.model_sha256
    assert registry.get_version(1) == info


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_champion_alias_loads_promoted_version_and_rollback_restores_previous(
    backend: Settings,
) -> None:
    first = labelled(seed=0)
    second = labelled(seed=1)
    v1 = registry.log_training_run(first)
    v2 = registry.log_training_run(second)
    frame = sample_inputs()
    expected_v1 = _flood_probability(first.pipeline, frame)
    expected_v2 = _flood_probability(second.pipeline, frame)
    assert not np.allclose(expected_v1, expected_v2), "the two versions must be distinguishable"

    # registry.connect (in log_training_run) pointed MLflow's fluent API at the backend.
    assert mlflow.get_registry_uri() == backend.tracking_uri
    champion_uri = f"models:/{backend.flood_model_name}@champion"

    promoted = registry.promote_version(v1.version)
    assert promoted.aliases == ["champion"]
    assert promoted.promoted_at is not None
    assert registry.resolve_alias().version == 1
    served = mlflow.pyfunc.load_model(champion_uri).predict(frame)
    assert served.shape == (len(frame),)
    np.testing.assert_allclose(served, expected_v1)

    registry.promote_version(v2.version)
    assert registry.resolve_alias().version == 2
    assert registry.get_version(1).aliases == []
    np.testing.assert_allclose(mlflow.pyfunc.load_model(champion_uri).predict(frame), expected_v2)

    rolled = registry.rollback_champion()
    assert rolled.version == 1
    assert registry.resolve_alias().version == 1
    np.testing.assert_allclose(mlflow.pyfunc.load_model(champion_uri).predict(frame), expected_v1)

    history = registry.champion_history()
    assert [(e.action, e.version, e.previous) for e in history] == [
        ("promote", 1, None),
        ("promote", 2, 1),
        ("rollback", 1, 2),
    ]
    with pytest.raises(RegistryError, match="first champion"):
        registry.rollback_champion()

    # The verified pipeline equals what was trained, and accepts partial rows.
    np.testing.assert_allclose(_flood_probability(registry.load_pipeline(2), frame), expected_v2)
    partial = frame.loc[:, ["temperature", "humidity", "rainfall"]]
    np.testing.assert_allclose(
        mlflow.pyfunc.load_model(champion_uri).predict(partial),
        _flood_probability(first.pipeline, partial),
    )


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_one_byte_change_in_artifact_store_is_detected(backend: Settings, tmp_path: Path) -> None:
    info = registry.log_training_run(labelled(seed=0))
    good = registry.download_model(info.version, tmp_path / "good")
    assert pipeline_path(good).is_file()
    assert registry.sha256_tree(good) == info.model_sha256

    model_id = info.source.removeprefix("models:/")
    stored = backend.artifact_root / "models" / model_id / "artifacts" / "artifacts" / "pipeline.skops"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))

    with pytest.raises(ModelIntegrityError, match="changed since registration"):
        registry.download_model(info.version, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ModelIntegrityError):
        registry.load_pipeline(info.version)
    with pytest.raises(ModelIntegrityError):
        registry.promote_version(info.version)


def test_synthetic_model_needs_flag_in_development_and_is_refused_in_production(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = registry.log_training_run(labelled(data_source="synthetic"))
    assert info.data_source == "synthetic"

    with pytest.raises(PromotionRefused, match="--allow-synthetic"):
        registry.promote_version(info.version)
    with pytest.raises(RegistryError, match="no 'champion' version yet"):
        registry.resolve_alias()

    assert registry.promote_version(info.version, allow_synthetic=True).is_champion

    monkeypatch.setenv("FLOOD_ENV", "production")
    monkeypatch.setenv("SECRET_KEY", "x" * 40)
    from core.settings import get_settings

    get_settings.cache_clear()
    assert get_settings().is_production
    second = registry.log_training_run(labelled(seed=1, data_source="synthetic"))
    with pytest.raises(PromotionRefused, match="never becomes champion in production"):
        registry.promote_version(second.version, allow_synthetic=True)
    assert registry.resolve_alias().version == info.version


def test_validation_failed_model_needs_flag_in_development(settings: Settings) -> None:
    info = registry.log_training_run(labelled(validation_passed=False))
    assert info.validation_status == "failed"
    assert info.validation_reason == "does not beat the rainfall baseline"
    with pytest.raises(PromotionRefused, match="failed validation"):
        registry.promote_version(info.version)
    assert registry.promote_version(info.version, allow_failed=True).is_champion


def test_unknown_version_and_missing_champion_are_registry_errors(settings: Settings) -> None:
    assert registry.list_versions() == []
    with pytest.raises(RegistryError, match="no 'champion' version yet"):
        registry.resolve_alias()
    with pytest.raises(RegistryError, match="no champion yet"):
        registry.rollback_champion()
    registry.log_training_run(labelled())
    with pytest.raises(RegistryError, match="has no version 7"):
        registry.get_version(7)
    with pytest.raises(RegistryError, match="has no version 7"):
        registry.promote_version(7)
    with pytest.raises(RegistryError, match="has no version 7"):
        registry.compare_versions(1, 7)


def test_compare_versions_lines_up_metrics(settings: Settings) -> None:
    first = registry.log_training_run(labelled(seed=0))
    second = registry.log_training_run(labelled(seed=1))
    rows = {row.metric: row for row in registry.compare_versions(1, 2)}
    assert set(rows) == set(first.metrics) | set(second.metrics)
    for name, row in rows.items():
        assert row.a == pytest.approx(first.metrics[name], nan_ok=True)
        assert row.b == pytest.approx(second.metrics[name], nan_ok=True)


def test_model_pins_explicit_requirements_and_signature(settings: Settings, tmp_path: Path) -> None:
    info = registry.log_training_run(labelled())
    model_dir = registry.download_model(info.version, tmp_path / "model")
    requirements = set((model_dir / "requirements.txt").read_text().split())
    expected = {
        f"{dist}=={importlib.metadata.version(dist)}"
        for dist in ("mlflow", "scikit-learn", "skops", "numpy", "pandas", "floodingnaque")
    }
    assert requirements == expected
    assert not (model_dir / "python_model.pkl").exists(), "logged from code, nothing pickled"
    model = mlflow.models.Model.load(str(model_dir / "MLmodel"))
    assert model.signature is not None
    inputs = {spec.name: spec.required for spec in model.signature.inputs.inputs}
    assert inputs == {
        "temperature": True,
        "humidity": True,
        "rainfall": True,
        "rainfall_3d": False,
        "rainfall_7d": False,
        "wind_speed": False,
        "month": False,
    }


def test_pyfunc_takes_integers_and_names_bad_columns(settings: Settings) -> None:
    info = registry.log_training_run(labelled())
    registry.promote_version(info.version)
    model = mlflow.pyfunc.load_model(f"models:/{settings.flood_model_name}@champion")
    typed = {"temperature": [28, 28, 28], "humidity": [85, 85, 85], "rainfall": [0, 5, 20]}
    as_ints = model.predict(pd.DataFrame(typed))
    as_floats = model.predict(pd.DataFrame(typed).astype(float))
    np.testing.assert_array_equal(as_ints, as_floats)
    assert as_ints.shape == (3,)
    # A typo for a required column is refused by name (MLflow's schema check), ...
    with pytest.raises(Exception, match="rainfall"):
        model.predict(pd.DataFrame({"temperature": [28], "humidity": [85], "rain": [3]}))
    # ... and so is a value that is not a number (ours: the signature types columns Any).
    with pytest.raises(Exception, match="'rainfall' must hold numbers"):
        model.predict(pd.DataFrame({**{k: v[:1] for k, v in typed.items()}, "rainfall": ["heavy"]}))


def test_every_candidate_is_a_child_run_and_the_version_names_its_winner(settings: Settings) -> None:
    result = labelled()
    info = registry.log_training_run(result)
    assert info.candidate == result.candidate
    standings = registry.candidate_standings(info.version)
    assert sorted(s.name for s in standings) == sorted(result.leaderboard["candidate"])
    assert [s.name for s in standings if s.winner] == [result.candidate]
    pooled = dict(zip(result.leaderboard["candidate"], result.leaderboard["pr_auc"], strict=True))
    for standing in standings:
        assert standing.metrics["pr_auc"] == pytest.approx(pooled[standing.name])
        years = {k.split("_")[1] for k in standing.metrics if k.startswith("test_")}
        assert years == {"2022", "2023"}
    # What each level is expected to do is stored beside its threshold.
    assert info.thresholds == result.thresholds
    assert 0 < info.thresholds.alert_rate <= 0.15
    assert 0 < info.thresholds.critical_rate <= 0.03


def test_a_new_flood_home_in_the_same_process_gets_its_own_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow exports the URI it is given as MLFLOW_TRACKING_URI, which Settings honours: left
    in place, the second home's models went to the first home's store (seen when the container
    tests ran after the serving tests in one session)."""
    from core.settings import get_settings
    from registry.backend import connect

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    uris = []
    for name in ("first", "second"):
        monkeypatch.setenv("FLOOD_HOME", str(tmp_path / name))
        get_settings.cache_clear()
        connect()
        uris.append(mlflow.get_tracking_uri())
        assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    get_settings.cache_clear()
    assert uris[0] != uris[1] and str(tmp_path / "second") in uris[1]
