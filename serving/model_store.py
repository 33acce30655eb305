"""Registry versions imported into the BentoML model store, compiled and verified once.

A BentoML model tag names its registry version and file hash (``flood-risk:v3-1a2b3c4d``)
so a Bento pins exactly one version and can never pick up a newer ``latest``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from core.checksum import sha256_file
from core.errors import ModelIntegrityError
from core.observation import INPUT_FIELDS
from ops.signing import SIGNATURE_FILE, sign_model_dir, verify_model_dir
from registry.integrity import PIPELINE_FILE, load_pipeline_file
from serving.compiled import CompiledForest, check_agreement, compile_forest
from serving.predictor import COMPILED_REPORT_FILE, ONNX_FILE, ServedModel

logger = logging.getLogger(__name__)

PROBE_ROWS = 2000


def bento_model_tag(model: ServedModel) -> str:
    return f"{model.name}:v{model.version}-{model.sha256[:8]}"


def sample_observations(n: int, *, seed: int = 0) -> np.ndarray:
    """Valid raw observation rows across the input ranges, some optionals missing.

    They are held out by construction (drawn, not taken from training data) and reach
    the corners of the input space that a compiled forest must also get right.
    """
    rng = np.random.default_rng(seed)
    spec = {f.name: f for f in INPUT_FIELDS}
    rain = np.minimum(rng.exponential(40.0, n) * (rng.random(n) < 0.7), spec["rainfall"].maximum)
    rain3 = rain + rng.exponential(30.0, n)
    rain7 = rain3 + rng.exponential(40.0, n)
    columns = {
        "temperature": rng.uniform(spec["temperature"].minimum, spec["temperature"].maximum, n),
        "humidity": rng.uniform(0.0, 100.0, n),
        "rainfall": rain,
        "rainfall_3d": np.minimum(rain3, spec["rainfall_3d"].maximum),
        "rainfall_7d": np.minimum(rain7, spec["rainfall_7d"].maximum),
        "wind_speed": rng.uniform(0.0, 20.0, n),
        "month": rng.integers(1, 13, n).astype(np.float64),
    }
    raw = np.column_stack([columns[f.name] for f in INPUT_FIELDS])
    for i, f in enumerate(INPUT_FIELDS):
        if not f.required:
            raw[rng.random(n) < 0.2, i] = np.nan
    return raw


def write_compiled_forest(model_dir: Path, *, probe_rows: np.ndarray) -> dict[str, Any]:
    """Compile the forest beside the pipeline and record whether it agrees with sklearn."""
    pipeline = load_pipeline_file(model_dir / PIPELINE_FILE)
    report: dict[str, Any]
    try:
        graph = compile_forest(pipeline)
        agreement = check_agreement(pipeline, CompiledForest(graph), probe_rows)
    except Exception as exc:  # any converter failure means "serve with sklearn", not "no Bento"
        logger.warning("ONNX conversion failed, the Bento will serve with sklearn: %s", exc)
        return {"agrees": False, "error": str(exc)}
    report = {
        "agrees": agreement.agrees,
        "rows": agreement.rows,
        "max_abs_diff": agreement.max_abs_diff,
        "tolerance": agreement.tolerance,
    }
    if agreement.agrees:
        (model_dir / ONNX_FILE).write_bytes(graph)
        report["onnx_sha256"] = sha256_file(model_dir / ONNX_FILE)
    else:
        logger.warning(
            "ONNX forest differs from sklearn by %.3g > %.0e; serving with sklearn",
            agreement.max_abs_diff,
            agreement.tolerance,
        )
    return report


def import_model(model: ServedModel, pipeline_file: Path, *, store_dir: Path) -> str:
    """Copy a verified pipeline file into the BentoML store, compiled; the tag, idempotently."""
    import bentoml
    from bentoml._internal.models import ModelStore
    from bentoml.exceptions import NotFound

    actual = sha256_file(pipeline_file)
    if actual != model.pipeline_sha256:
        raise ModelIntegrityError(f"{pipeline_file}: sha256 {actual} is not {model.pipeline_sha256}")
    tag = bento_model_tag(model)
    store = ModelStore(str(store_dir))
    try:
        existing = store.get(tag)
    except NotFound:
        existing = None
    if existing is not None:
        if existing.info.labels.get("sha256") != model.sha256:
            raise ModelIntegrityError(f"BentoML model {tag} exists with different contents")
        logger.info("BentoML model %s already imported", tag)
        return tag
    with bentoml.models.create(
        tag,
        labels=model.to_labels(),
        metadata={"metrics": model.metrics},
        _model_store=store,
    ) as stored:
        target = Path(stored.path)
        shutil.copy2(pipeline_file, target / PIPELINE_FILE)
        report = write_compiled_forest(target, probe_rows=sample_observations(PROBE_ROWS))
        (target / COMPILED_REPORT_FILE).write_text(json.dumps(report, indent=2))
    logger.info("imported %s (compiled forest: %s)", tag, report)
    return tag


def sign_imported_model(tag: str, *, store_dir: Path, key: bytes) -> Path:
    """Sign a stored model's files with MODEL_SIGNING_KEY; the signature file's path.

    A model is signed once: an existing signature must verify (it is never rewritten over
    files that changed since), and an unsigned model is signed only if its pipeline file
    still has the checksum the registry recorded.
    """
    served, model_dir = read_model(tag, store_dir=store_dir)
    signature = model_dir / SIGNATURE_FILE
    if signature.is_file():
        verify_model_dir(model_dir, key)
        return signature
    actual = sha256_file(model_dir / PIPELINE_FILE)
    if actual != served.pipeline_sha256:
        raise ModelIntegrityError(
            f"{model_dir / PIPELINE_FILE}: sha256 {actual} is not {served.pipeline_sha256}; not signing it"
        )
    return sign_model_dir(model_dir, key)


def served_model_of(stored: Any) -> ServedModel:
    """The registry facts recorded in a stored BentoML model's labels and metadata."""
    metrics = stored.info.metadata.get("metrics", {})
    return ServedModel.from_labels(
        dict(stored.info.labels),
        bento_model_tag=str(stored.tag),
        metrics=dict(metrics) if isinstance(metrics, dict) else {},
    )


def read_model(tag: str, *, store_dir: Path | None = None) -> tuple[ServedModel, Path]:
    """A stored model's registry facts and files; the process's own store unless given."""
    import bentoml
    from bentoml._internal.models import ModelStore

    stored = ModelStore(str(store_dir)).get(tag) if store_dir is not None else bentoml.models.get(tag)
    return served_model_of(stored), Path(stored.path)
