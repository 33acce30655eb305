"""The two registered model versions every peer serves: the real model and a stress forest.

Both go through the product path: a ``TrainingResult`` logged and registered in MLflow,
imported (and compiled to ONNX) into the BentoML store, and built into a Bento pinned to
that version, so mlflow, the Bento and the ceiling all read the same bytes.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import Pipeline

from core.features import FeatureBuilder
from core.observation import FIELD_NAMES
from core.risk import Thresholds
from core.settings import Settings
from training.result import TrainingResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForestSpec:
    """How a stress forest is grown: deep trees need many rows and noisy labels."""

    trees: int = 200
    max_depth: int = 16
    rows: int = 8000
    label_noise: float = 0.25
    seed: int = 0


@dataclass(frozen=True)
class BenchModel:
    """One registered version, as every peer serves it."""

    kind: str  # "real" or "stress"
    version: int
    data_source: str
    bento_model_tag: str
    bento_tag: str
    bento_path: Path
    model_dir: Path  # the BentoML model directory (pipeline + model.onnx)
    pipeline_sha256: str
    engine: str  # what the Bento and the ceiling run: "onnxruntime" or "sklearn"
    facts: dict[str, Any]  # model_facts

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["bento_path"] = str(self.bento_path)
        out["model_dir"] = str(self.model_dir)
        return out


def complete_rows(n: int, *, seed: int) -> pd.DataFrame:
    """Valid observations with every field present, as mlflow's schema wants them (doubles)."""
    from bundle.onnx import sample_observations

    raw = sample_observations(n, seed=seed)
    frame = pd.DataFrame(raw, columns=list(FIELD_NAMES))
    frame["rainfall_3d"] = frame["rainfall_3d"].fillna(frame["rainfall"])
    frame["rainfall_7d"] = frame["rainfall_7d"].fillna(frame["rainfall_3d"])
    frame["wind_speed"] = frame["wind_speed"].fillna(3.0)
    frame["month"] = frame["month"].fillna(7.0)
    return frame.round(2)


def model_facts(pipeline: Pipeline) -> dict[str, Any]:
    """The served family and, for tree ensembles, their size (what ONNX and sklearn walk)."""
    model = pipeline.named_steps["model"]
    if hasattr(model, "calibrated_classifiers_"):  # the recalibrated v1 forest
        model = model.calibrated_classifiers_[0].estimator
    facts: dict[str, Any] = {
        "family": type(model).__name__,
        "features": int(model.n_features_in_),
        "raw_fields": len(FIELD_NAMES),
    }
    trees = [estimator.tree_ for estimator in getattr(model, "estimators_", [])]
    if not trees:  # not a forest: logistic, boosting
        return {**facts, "trees": 0, "node_count": 0, "leaf_count": 0, "max_depth": 0, "mean_depth": 0.0}
    return {
        **facts,
        "trees": len(trees),
        "node_count": int(sum(t.node_count for t in trees)),
        "leaf_count": int(sum(t.n_leaves for t in trees)),
        "max_depth": int(max(t.max_depth for t in trees)),
        "mean_depth": round(float(np.mean([t.max_depth for t in trees])), 2),
    }


def train_stress(spec: ForestSpec) -> TrainingResult:
    """A forest of ``spec.trees`` trees grown to ``spec.max_depth`` on noisy synthetic labels.

    It is the product's pipeline (FeatureBuilder, then the forest), so it is served through
    every peer unchanged; it therefore sees the pipeline's 10 derived features, not 20.
    """
    rng = np.random.default_rng(spec.seed)
    frame = complete_rows(spec.rows, seed=spec.seed)
    score = np.log1p(frame["rainfall_3d"]) + frame["humidity"] / 40.0 + rng.normal(0, 1.0, len(frame))
    label = np.array(score > np.quantile(score, 0.8), dtype=np.int64)
    flip = rng.random(len(label)) < spec.label_noise
    label[flip] = 1 - label[flip]
    forest = RandomForestClassifier(
        n_estimators=spec.trees,
        max_depth=spec.max_depth,
        min_samples_leaf=1,
        max_features="sqrt",
        n_jobs=1,
        random_state=spec.seed,
    )
    pipeline = Pipeline([("features", FeatureBuilder()), ("model", forest)]).fit(frame, label)
    facts = model_facts(pipeline)
    per_year = pd.DataFrame([{"split": "none", "note": "benchmark stress forest, not evaluated"}])
    return TrainingResult(
        pipeline=pipeline,
        thresholds=Thresholds(alert=0.3, critical=0.6, rule="fixed (benchmark stress model)"),
        data_source="synthetic",
        params={"purpose": "benchmark-stress", **asdict(spec), **facts},
        metrics={},
        per_year=per_year,
        validation_passed=False,
        validation_reason="benchmark stress model; not a flood model",
        input_example=frame.head(3),
    )


def train_real(settings: Settings, *, trees: int | None) -> TrainingResult:
    """The product model: real data when present (synthetic otherwise, recorded as such)."""
    from training.data import has_real_data, load_dataset
    from training.pipeline import train_model
    from training.synthetic import generate_dataset

    if has_real_data(settings.flood_data_dir):
        dataset = load_dataset(settings.flood_data_dir)
    else:
        logger.warning(
            "no real data at %s: the 'real' model is trained on synthetic data", settings.flood_data_dir
        )
        dataset = generate_dataset(seed=0)
    kwargs: dict[str, Any] = {"seed": 0, "reports_dir": settings.reports_dir}
    if trees is not None:
        kwargs["n_estimators"] = trees
    return train_model(dataset, **kwargs)


def register_and_build(kind: str, result: TrainingResult, *, settings: Settings, workdir: Path) -> BenchModel:
    """Register ``result`` as a new version and build a Bento pinned to it."""
    import registry
    from bundle.bentos import build_bento, find_bento
    from bundle.model_import import import_registry_version
    from serving.model_store import read_model
    from serving.predictor import engine_for

    info = registry.log_training_run(result)
    model_tag = import_registry_version(info.version, settings=settings, workdir=workdir / f"download-{kind}")
    served, model_dir = read_model(model_tag, store_dir=settings.bentoml_home / "models")
    bento = find_bento(build_bento(model_tag, settings=settings), settings=settings)
    logger.info("%s model: version %s, Bento %s", kind, info.version, bento.tag)
    return BenchModel(
        kind=kind,
        version=info.version,
        data_source=info.data_source,
        bento_model_tag=model_tag,
        bento_tag=bento.tag,
        bento_path=bento.path,
        model_dir=model_dir,
        pipeline_sha256=served.pipeline_sha256,
        engine=engine_for(model_dir),
        facts=model_facts(result.pipeline),
    )
