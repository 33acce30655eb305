"""Every private BentoML (1.4) API the project uses, and why; nothing else imports ``bentoml._internal``.

Each accessor imports lazily, so importing this module costs nothing and a moved name fails
where it is used with the name in the message. ``tests/serving/test_bentoml_internals.py``
resolves every one of them, so a BentoML upgrade that moves any fails that test first.
"""

from __future__ import annotations

from typing import Any

# name -> (module, attribute or None for the module): what the accessors below resolve; the
# test walks this table.
PRIVATE_NAMES: dict[str, tuple[str, str | None]] = {
    # The Bento's own tag and the worker's @bentoml.api routes: no public accessor exists.
    "server_context": ("bentoml._internal.context", "server_context"),
    # The request-metrics middleware labels by raw path; serving.hardening replaces the
    # class in this module with a subclass that bounds the labels. No public hook exists.
    "instruments": ("bentoml._internal.server.http.instruments", None),
    "traffic_metrics_middleware": (
        "bentoml._internal.server.http.instruments",
        "RunnerTrafficMetricsMiddleware",
    ),
    # Stores at an explicit path (a staged or temporary FLOOD_HOME) without re-pointing the
    # process-wide BENTOML_HOME; bentoml.models/bentoml.bentos only use the global store.
    "model_store": ("bentoml._internal.models", "ModelStore"),
    "bento_store": ("bentoml._internal.bento", "BentoStore"),
    # The arbiter that owns the API socket; serving.handover closes it on stop so a
    # replacement server inherits the port (zero-downtime handover), and serving.hardening
    # moves its command endpoints off TCP.
    "arbiter": ("bentoml._internal.utils.circus", "Arbiter"),
    # BentoML's API worker: it builds its uvicorn.Config with no http= (so uvicorn's "auto",
    # httptools when installed) and no option bounding request headers or their read time;
    # the service config has none either. serving.hardening subclasses uvicorn's httptools
    # protocol to bound both, and serve_http_with() makes "auto" resolve to it.
    "api_worker": ("_bentoml_impl.worker.service", "main"),
    "uvicorn_auto_http": ("uvicorn.protocols.http.auto", None),
    # What serve_http builds its arbiter with: create_standalone_arbiter passes it ZMQ TCP
    # control and event endpoints on 127.0.0.1, which take commands from any local user.
    # serving.hardening moves them to ipc sockets in a private directory (in Arbiter).
    "arbiter_factory": ("bentoml._internal.utils.circus", "create_standalone_arbiter"),
    # The uid/gid of the user `bentoml containerize` creates in the image; the Kubernetes
    # manifests run as it (tests/test_k8s.py).
    "bento_uid_gid": ("bentoml._internal.container.generate", "BENTO_UID_GID"),
    "httptools_protocol": ("uvicorn.protocols.http.httptools_impl", "HttpToolsProtocol"),
}


def resolve(name: str) -> Any:
    """The object behind ``PRIVATE_NAMES[name]``; ``ImportError`` naming it if BentoML moved it."""
    import importlib

    module_name, attribute = PRIVATE_NAMES[name]
    try:
        module = importlib.import_module(module_name)
        return module if attribute is None else getattr(module, attribute)
    except (ImportError, AttributeError) as exc:
        raise ImportError(
            f"BentoML private API {module_name}.{attribute or ''} ({name}) is gone in this BentoML "
            f"version; see serving/bentoml_internals.py"
        ) from exc


def current_bento_tag() -> str | None:
    """``name:version`` of the Bento this process serves; None outside a built Bento."""
    context = resolve("server_context")
    if context.bento_name and context.bento_version != "not available":
        return f"{context.bento_name}:{context.bento_version}"
    return None


def worker_service_routes() -> frozenset[str]:
    """The current worker's own ``@bentoml.api`` routes (the model service's ``/predict``)."""
    return frozenset(resolve("server_context").service_routes)


def model_store(path: str) -> Any:
    return resolve("model_store")(path)


def bento_store(path: str) -> Any:
    return resolve("bento_store")(path)


def serve_http_with(protocol: type) -> None:
    """Every uvicorn server this process starts with ``http="auto"`` (BentoML's workers: see
    ``api_worker``) speaks HTTP/1.1 through ``protocol``. Call it before the worker's server
    starts, i.e. where the service is defined: uvicorn resolves "auto" when it starts."""
    resolve("uvicorn_auto_http").AutoHTTPProtocol = protocol
