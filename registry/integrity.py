"""Model files on disk: the skops pipeline file, its trusted types, and tree checksums.

No MLflow here: the serving side can verify and load a downloaded model directory with
these functions alone.

A downloaded model directory (``registry.download_model``) is an MLflow pyfunc model::

    <dir>/MLmodel, requirements.txt, python_env.yaml, conda.yaml, flood_model.py, ...
    <dir>/artifacts/pipeline.skops      <- the fitted sklearn Pipeline (``pipeline_path(dir)``)
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from sklearn.pipeline import Pipeline

from core.errors import ModelIntegrityError

logger = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.skops"
# MLflow copies pyfunc artifacts into this sub-folder of the model directory.
MODEL_DATA_DIR = "artifacts"

# skops refuses to build types it does not know are safe; these are the only non-default
# ones a flood model may contain. Anything else in a pipeline file means it was not written
# by ``training`` and is refused rather than executed.
TRUSTED_TYPES: frozenset[str] = frozenset(
    {
        "core.features.FeatureBuilder",
        "sklearn.pipeline.Pipeline",
        "sklearn.ensemble._forest.RandomForestClassifier",
        "sklearn.tree._classes.DecisionTreeClassifier",
        "sklearn.tree._tree.Tree",
        # Every candidate family is calibrated on time blocks (training.model).
        "sklearn.calibration._CalibratedClassifier",
        "sklearn.calibration._SigmoidCalibration",
        "sklearn.model_selection._split.KFold",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    }
)
# MLflow writes this into the stored model directory itself whenever a local store is read
# through a ``models:/name@alias`` URI; it records which alias was read, not model content.
UNHASHED_FILES: frozenset[str] = frozenset({"registered_model_meta"})


def pipeline_path(model_dir: Path) -> Path:
    """Where the pipeline file sits inside a downloaded model directory."""
    return model_dir / MODEL_DATA_DIR / PIPELINE_FILE


def sha256_tree(path: Path) -> str:
    """SHA-256 over every file below ``path``: sorted relative POSIX paths and their bytes.

    Paths are hashed too, so renaming or moving a file changes the digest; each entry is
    length-prefixed so no two different trees can produce the same byte stream. Top-level
    ``UNHASHED_FILES`` (MLflow's read bookkeeping) are skipped.
    """
    if not path.is_dir():
        raise ModelIntegrityError(f"{path} is not a directory")
    names = sorted(
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if p.is_file() and p.relative_to(path).as_posix() not in UNHASHED_FILES
    )
    digest = hashlib.sha256()
    for name in names:
        file = path / name
        encoded = name.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "big"))
        digest.update(encoded)
        digest.update(file.stat().st_size.to_bytes(8, "big"))
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def save_pipeline(pipeline: Pipeline, path: Path) -> Path:
    import skops.io as sio

    path.parent.mkdir(parents=True, exist_ok=True)
    sio.dump(pipeline, path)
    # Fail at training time, not at serving time, if the pipeline holds a type we would refuse.
    check_trusted_types(path)
    return path


def check_trusted_types(path: Path) -> list[str]:
    """The non-default types in a skops file; raises if any is outside ``TRUSTED_TYPES``."""
    import skops.io as sio

    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as exc:  # a damaged zip or schema surfaces as many different types
        raise ModelIntegrityError(f"{path}: not a readable skops file ({exc})") from exc
    refused = sorted(set(untrusted) - TRUSTED_TYPES)
    if refused:
        raise ModelIntegrityError(f"{path}: refusing to load untrusted types {refused}")
    return sorted(untrusted)


def load_pipeline_file(path: Path) -> Pipeline:
    """A fitted Pipeline from a skops file, building only types on the allowlist."""
    import skops.io as sio

    if not path.is_file():
        raise ModelIntegrityError(f"{path}: pipeline file is missing")
    trusted = check_trusted_types(path)
    try:
        pipeline = sio.load(path, trusted=trusted)
    except Exception as exc:
        raise ModelIntegrityError(f"{path}: cannot load pipeline ({exc})") from exc
    if not isinstance(pipeline, Pipeline):
        raise ModelIntegrityError(f"{path}: expected a sklearn Pipeline, got {type(pipeline).__name__}")
    logger.debug("loaded pipeline %s (trusted types %s)", path, trusted)
    return pipeline
