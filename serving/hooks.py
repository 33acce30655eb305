"""The seam where operations concerns plug into the HTTP edge.

API keys and rate limits are *guards*: they see a request to ``/api/v1/*`` before any
work and may answer it themselves (401, 429). The prediction log is a *listener*: it
receives every answered prediction. Health and metrics routes are never guarded, so
probes keep working when keys or Redis do not.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

RequestGuard = Callable[[Request], Awaitable[Response | None]]


@dataclass(frozen=True)
class PredictionRecord:
    request_id: str
    observation: dict[str, Any]
    probability: float
    risk_level: str
    model_version: int


PredictionListener = Callable[[Request, Sequence[PredictionRecord]], Awaitable[None]]


@dataclass
class EdgeHooks:
    guards: list[RequestGuard] = field(default_factory=list)
    listeners: list[PredictionListener] = field(default_factory=list)


def load_hooks() -> EdgeHooks:
    """The guards and listeners the service runs with (none until ops registers its own)."""
    return EdgeHooks()
