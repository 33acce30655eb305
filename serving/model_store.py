"""The model a Bento pins, read from the BentoML model store at run time.

``flood bento build`` put it there; its labels carry the registry facts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.errors import ConfigurationError
from serving import bentoml_internals
from serving.predictor import ServedModel


def pinned_model_tag() -> str:
    """The model tag this Bento was built with (``--arg model_tag``); never ``latest``."""
    from bentoml import use_arguments

    tag = str(getattr(use_arguments(), "model_tag", "") or "")
    name, _, version = tag.partition(":")
    if not name or not version or version == "latest":
        raise ConfigurationError(
            f"model_tag {tag!r} does not pin a model version; build with `flood bento build` "
            "or pass --arg model_tag=<name>:<version>"
        )
    return tag


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

    stored = (
        bentoml_internals.model_store(str(store_dir)).get(tag)
        if store_dir is not None
        else bentoml.models.get(tag)
    )
    return served_model_of(stored), Path(stored.path)
