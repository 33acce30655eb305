"""Fixtures for the build-time tests: the serving tests' registry versions and imported models."""

from __future__ import annotations

# Session fixtures of the serving tests (registry versions, Bentos); a name, used by name.
from tests.serving.conftest import built_home, predictor, served_model  # noqa: F401
