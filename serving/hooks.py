"""The seam where operations concerns plug into the HTTP edge.

API keys are *guards*: they see a request to ``/api/v1/*`` before any work and may answer
it themselves (401). Rate limits are *charges*: they run once the edge knows what the
request costs (a batch costs by rows) and may answer 429. The prediction log is a
*listener*: it receives every answered prediction. Guards and charges may put response
headers in ``request.state.edge_headers``; the edge sends them with whatever it answers.
``health`` reports the state of those concerns for ``/health/detailed``. Health and
metrics routes are never guarded, so probes keep working when keys or Redis do not.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ops.predictionlog import PredictionRecord

RequestGuard = Callable[[Request], Awaitable[Response | None]]
# (request, route, rows): route is "predict", "predict_batch" or "model".
RequestCharge = Callable[[Request, str, int], Awaitable[Response | None]]
PredictionListener = Callable[[Request, Sequence[PredictionRecord]], Awaitable[None]]
# name -> a report with at least "status": "ok" or "degraded".
HealthReporter = Callable[[], Awaitable[dict[str, dict[str, Any]]]]


@dataclass
class EdgeHooks:
    guards: list[RequestGuard] = field(default_factory=list)
    charges: list[RequestCharge] = field(default_factory=list)
    listeners: list[PredictionListener] = field(default_factory=list)
    health: HealthReporter | None = None


def edge_headers(request: Request) -> dict[str, str]:
    """The headers guards and charges want sent with this request's answer."""
    headers: dict[str, str] | None = getattr(request.state, "edge_headers", None)
    if headers is None:
        headers = {}
        request.state.edge_headers = headers
    return headers
