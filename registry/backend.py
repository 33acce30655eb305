"""Connecting to the MLflow tracking store and model registry named by the settings.

MLflow is imported only through ``import_mlflow`` so that importing ``registry`` stays cheap
and so that telemetry is switched off before MLflow decides about it (it does so once, on
first import, and would otherwise try to reach the internet).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from core.errors import RegistryError
from core.settings import get_settings

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)


def import_mlflow() -> ModuleType:
    # setdefault: an operator who explicitly opts in keeps their choice.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow


def display_uri(uri: str) -> str:
    """The tracking URI with any password masked, for messages and logs."""
    if "://" not in uri or uri.startswith(("file:", "sqlite:")):
        return uri
    from sqlalchemy.engine import make_url

    try:
        return make_url(uri).render_as_string(hide_password=True)
    except Exception:
        return uri.split("://", 1)[0] + "://***"


_EXPORTED_BY_MLFLOW = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def ui_argv(*, host: str, port: int) -> list[str]:
    """``mlflow ui`` on the project's own store (MLFLOW_TRACKING_URI or FLOOD_HOME's SQLite)."""
    import sys

    uri = get_settings().tracking_uri
    mlflow = Path(sys.executable).with_name("mlflow")
    return [str(mlflow), "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]


def connect() -> MlflowClient:
    """A client for ``settings.tracking_uri``; also points MLflow's fluent API at it."""
    mlflow = import_mlflow()
    uri = get_settings().tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # The fluent API (start_run, log_model, pyfunc.load_model) and parts of the registry
    # store read the process-wide URIs, so both must agree with the client's.
    exported = {name: os.environ.get(name) for name in _EXPORTED_BY_MLFLOW}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # MLflow also exports them as MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI, which Settings
    # would then read as the user's own choice: a later FLOOD_HOME in this process (a test
    # session, a long-lived caller) kept talking to the first store. MLflow's own globals
    # still hold the URI; subprocesses that need it are given it explicitly.
    for name, value in exported.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        client: MlflowClient = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    except Exception as exc:
        raise RegistryError(f"cannot open the MLflow store at {display_uri(uri)}: {exc}") from exc
    return client


def ensure_experiment(client: MlflowClient) -> str:
    """The id of ``settings.flood_experiment``, created with artifacts under ``artifact_root``."""
    from mlflow.exceptions import MlflowException

    settings = get_settings()
    name = settings.flood_experiment
    location = settings.artifact_root.as_uri()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        settings.artifact_root.mkdir(parents=True, exist_ok=True)
        try:
            experiment_id: str = client.create_experiment(name, artifact_location=location)
            logger.info("created MLflow experiment %r with artifacts at %s", name, location)
            return experiment_id
        except MlflowException:
            # Another process may have created it between our lookup and create.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise RegistryError(
            f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore) "
            "or set FLOOD_EXPERIMENT to another name"
        )
    if experiment.artifact_location != location:
        logger.warning(
            "experiment %r stores artifacts at %s, not at artifact_root %s",
            name,
            experiment.artifact_location,
            location,
        )
    return str(experiment.experiment_id)


def is_not_found(exc: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST"
