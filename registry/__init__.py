"""The MLflow model registry of the flood model; the only package that imports mlflow.

Everything else goes through these functions. Importing this package is cheap and has no
side effects: each name loads its module on first use (PEP 562), and MLflow itself is
imported on the first call that needs it, so ``flood --help`` does not pay for either.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_MODULES = {
    "registry.champion": (
        "ChampionEvent",
        "champion_history",
        "check_promotable",
        "promote_version",
        "rollback_champion",
    ),
    "registry.integrity": (
        "PIPELINE_FILE",
        "TRUSTED_TYPES",
        "load_pipeline_file",
        "pipeline_path",
        "sha256_tree",
    ),
    "registry.runs": ("log_run", "log_training_run", "register_run"),
    "registry.versions": (
        "CandidateStanding",
        "MetricComparison",
        "ModelVersionInfo",
        "candidate_standings",
        "compare_versions",
        "download_model",
        "get_version",
        "list_versions",
        "load_pipeline",
        "resolve_alias",
    ),
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}
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


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'registry' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value
