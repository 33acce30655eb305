"""The MLflow model registry of the flood model; the only package that imports mlflow.

Everything else goes through these functions. MLflow itself is imported lazily, on the
first call that needs it, so importing this package is cheap and has no side effects.
"""

from __future__ import annotations

from registry.champion import (
    ChampionEvent,
    champion_history,
    check_promotable,
    promote_version,
    rollback_champion,
)
from registry.integrity import (
    PIPELINE_FILE,
    TRUSTED_TYPES,
    load_pipeline_file,
    pipeline_path,
    sha256_tree,
)
from registry.runs import log_run, log_training_run, register_run
from registry.versions import (
    CandidateStanding,
    MetricComparison,
    ModelVersionInfo,
    candidate_standings,
    compare_versions,
    download_model,
    get_version,
    list_versions,
    load_pipeline,
    resolve_alias,
)

__all__ = [
    "PIPELINE_FILE",
    "TRUSTED_TYPES",
    "CandidateStanding",
    "ChampionEvent",
    "MetricComparison",
    "ModelVersionInfo",
    "candidate_standings",
    "champion_history",
    "check_promotable",
    "compare_versions",
    "download_model",
    "get_version",
    "list_versions",
    "load_pipeline",
    "load_pipeline_file",
    "log_run",
    "log_training_run",
    "pipeline_path",
    "promote_version",
    "register_run",
    "resolve_alias",
    "rollback_champion",
    "sha256_tree",
]
