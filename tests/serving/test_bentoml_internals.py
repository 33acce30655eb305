"""A BentoML upgrade that moves a private API the project relies on fails here, by name."""

from __future__ import annotations

import subprocess
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
