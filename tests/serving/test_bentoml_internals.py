"""A BentoML upgrade that moves a private API the project relies on fails here, by name."""

from __future__ import annotations

import ast
import inspect
import subprocess
import textwrap
from pathlib import Path

import pytest

from serving import bentoml_internals
from serving.bentoml_internals import PRIVATE_NAMES, resolve

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(PRIVATE_NAMES))
def test_every_private_name_still_resolves(name: str) -> None:
    assert resolve(name) is not None


def test_the_traffic_middleware_is_still_a_class_hardening_can_subclass() -> None:
    middleware = resolve("traffic_metrics_middleware")
    assert isinstance(middleware, type)
    assert resolve("instruments").RunnerTrafficMetricsMiddleware is middleware


def test_a_moved_name_says_which_and_where() -> None:
    PRIVATE_NAMES["gone"] = ("bentoml._internal.nowhere", "Thing")
    try:
        with pytest.raises(ImportError, match=r"bentoml\._internal\.nowhere\.Thing \(gone\)"):
            resolve("gone")
    finally:
        del PRIVATE_NAMES["gone"]


def test_outside_a_bento_there_is_no_bento_tag() -> None:
    assert bentoml_internals.current_bento_tag() is None


def test_no_other_module_imports_bentoml_private_apis() -> None:
    found = subprocess.run(
        ["git", "grep", "-lF", "bentoml._internal", "--", "*.py"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    assert sorted(found) == ["serving/bentoml_internals.py", "tests/serving/test_bentoml_internals.py"], found


def test_bentomls_worker_still_leaves_uvicorns_http_protocol_on_auto() -> None:
    """serving.hardening bounds request headers by replacing what uvicorn's "auto" resolves
    to; a BentoML that picks the protocol itself, or starts offering the bounds, fails here."""
    worker = resolve("api_worker")
    tree = ast.parse(textwrap.dedent(inspect.getsource(worker.callback)))
    configs = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Config"
    ]
    assert len(configs) == 1, "BentoML's worker no longer builds one uvicorn.Config"
    keywords = {keyword.arg for keyword in configs[0].keywords}
    assert "app" in keywords and None in keywords  # **uvicorn_extra_options
    extra = {
        node.slice.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Name)
        and node.value.id == "uvicorn_extra_options"
        and isinstance(node.slice, ast.Constant)
    }
    assert extra, "BentoML's worker no longer fills uvicorn_extra_options by key"
    bounds = {"http", "h11_max_incomplete_event_size", "limit_concurrency"}
    assert not (keywords | extra) & bounds, keywords | extra


def test_serve_http_with_is_what_an_auto_uvicorn_config_loads() -> None:
    import uvicorn

    auto = resolve("uvicorn_auto_http")
    original = auto.AutoHTTPProtocol
    base = resolve("httptools_protocol")

    class Marker(base):  # type: ignore[misc, valid-type]
        pass

    async def app(scope: object, receive: object, send: object) -> None:
        raise AssertionError("not called")

    try:
        bentoml_internals.serve_http_with(Marker)
        config = uvicorn.Config(app=app, log_config=None, lifespan="off")
        config.load()
        assert config.http_protocol_class is Marker
    finally:
        auto.AutoHTTPProtocol = original


def test_the_httptools_protocol_still_has_the_hooks_hardening_overrides() -> None:
    protocol = resolve("httptools_protocol")
    for hook in (
        "connection_made",
        "connection_lost",
        "data_received",
        "on_message_begin",
        "on_headers_complete",
        "on_message_complete",
    ):
        assert callable(getattr(protocol, hook, None)), hook
    # What the subclass reads from an instance: uvicorn sets these in __init__/connection_made.
    source = inspect.getsource(protocol)
    for attribute in ("self.transport", "self.loop", "self.server_state"):
        assert attribute in source, attribute


def test_arbiters_bentoml_builds_take_private_ipc_endpoints() -> None:
    """serving.hardening moves circus's command endpoints by wrapping the Arbiter class that
    BentoML's factory instantiates; a factory that stops passing them through fails here."""
    from serving.hardening import run_arbiter_privately

    run_arbiter_privately()
    arbiter = resolve("arbiter_factory")([])
    try:
        endpoints = [arbiter.endpoint, arbiter.pubsub_endpoint]
        assert all(e.startswith("ipc://") for e in endpoints), endpoints
        directory = Path(arbiter.endpoint.removeprefix("ipc://")).parent
        assert directory.stat().st_mode & 0o777 == 0o700
    finally:
        arbiter.exit_stack.close()
    assert not directory.exists(), "the endpoints' directory outlived its arbiter"
