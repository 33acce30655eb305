"""The layout shows the architecture: who may import whom, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_roots(package: str) -> dict[str, set[str]]:
    """Top-level modules each file of ``package`` imports (lazy imports included)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("serving", {"training", "bundle", "cli", "mlflow"}),
        ("ops", {"serving", "training", "bundle", "cli", "mlflow"}),
        ("core", {"serving", "ops", "training", "registry", "bundle", "cli", "mlflow"}),
        ("training", {"serving", "bundle", "mlflow"}),
        ("bundle", {"training"}),
    ],
)
def test_imports_point_one_way(package: str, forbidden: set[str]) -> None:
    offenders = {
        path: names & forbidden for path, names in imported_roots(package).items() if names & forbidden
    }
    assert not offenders, offenders


def test_registry_is_the_only_code_that_imports_mlflow() -> None:
    importers = {
        path
        for package in ("core", "ops", "serving", "training", "bundle", "cli")
        for path, names in imported_roots(package).items()
        if "mlflow" in names
    }
    assert not importers, importers
    assert any("mlflow" in names for names in imported_roots("registry").values())
