"""Registry versions imported into the BentoML model store, compiled and verified once.

A BentoML model tag names its registry version and file hash (``flood-risk:v3-1a2b3c4d``)
so a Bento pins exactly one version and can never pick up a newer ``latest``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from bundle.onnx import PROBE_ROWS, sample_observations, write_compiled_forest
from core.checksum import sha256_file
from core.errors import ModelIntegrityError
from core.settings import Settings
from ops.signing import SIGNATURE_FILE, sign_model_dir, signing_key, verify_model_dir
from registry.integrity import PIPELINE_FILE
from serving import bentoml_internals
from serving.model_store import read_model
from serving.predictor import COMPILED_REPORT_FILE, ServedModel

logger = logging.getLogger(__name__)


def bento_model_tag(model: ServedModel) -> str:
    return f"{model.name}:v{model.version}-{model.sha256[:8]}"


def verify_run_id(model_dir: Path, run_id: str) -> None:
    """The downloaded model must come from the run the registry version names."""
    import yaml

    recorded = yaml.safe_load((model_dir / "MLmodel").read_text()).get("run_id")
    if not run_id or recorded != run_id:
        raise ModelIntegrityError(
            f"model files were logged by run {recorded!r}, the registry version names {run_id!r}"
        )


def import_registry_version(version: int | None, *, settings: Settings, workdir: Path) -> str:
    """Resolve (default: the champion), download, verify and import one registry version.

    ``download_model`` checks the files against the version's recorded sha256; the run id
    in the files must match the version's; the BentoML model tag records both. With
    MODEL_SIGNING_KEY set, the imported model is signed.
    """
    import registry

    info = registry.get_version(version) if version is not None else registry.resolve_alias()
    model_dir = registry.download_model(info.version, workdir / f"v{info.version}")
    verify_run_id(model_dir, info.run_id)
    pipeline_file = registry.pipeline_path(model_dir)
    served = ServedModel(
        name=info.name,
        version=info.version,
        bento_model_tag="",
        run_id=info.run_id,
        data_source=info.data_source,
        sha256=info.model_sha256,
        pipeline_sha256=sha256_file(pipeline_file),
        thresholds=info.thresholds,
        validation_status=info.validation_status,
        metrics=dict(info.metrics),
        created_at=info.created_at.isoformat(),
    )
    store_dir = settings.bentoml_home / "models"
    tag = import_model(served, pipeline_file, store_dir=store_dir)
    if settings.model_signing_key is not None:
        # Signed as stored, so the Bento carries the signature its service checks at start.
        sign_imported_model(tag, store_dir=store_dir, key=signing_key(settings))
    return tag


def import_model(model: ServedModel, pipeline_file: Path, *, store_dir: Path) -> str:
    """Copy a verified pipeline file into the BentoML store, compiled; the tag, idempotently."""
    import bentoml
    from bentoml.exceptions import NotFound

    actual = sha256_file(pipeline_file)
    if actual != model.pipeline_sha256:
        raise ModelIntegrityError(f"{pipeline_file}: sha256 {actual} is not {model.pipeline_sha256}")
    tag = bento_model_tag(model)
    store = bentoml_internals.model_store(str(store_dir))
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
