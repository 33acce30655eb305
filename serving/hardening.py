"""What keeps BentoML's own request metrics and access log safe from what clients send.

BentoML labels its request metrics with the raw request path, so every distinct path a
scanner tries (``/wp-admin``, ``/x1``, ``/x2``, ...) would add series to ``/metrics`` for
the life of the server, in memory and in the multiprocess files behind it. Its access log
writes the decoded path, so ``/x%0A<forged line>`` would start a line of its own.

:func:`bound_request_metric_labels` makes BentoML's metrics middleware label paths that no
route serves as ``other`` (the request itself still sees its real path, so it is answered
exactly as before); :class:`ControlCharacterEscaper` escapes control characters in
access-log lines.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from serving import bentoml_internals

OTHER_PATH_LABEL = "other"
# BentoML's own routes on the API service (health probes, metrics, its docs).
BENTOML_PATHS = frozenset({"/livez", "/healthz", "/readyz", "/metrics", "/docs.json", "/docs", "/"})
_ORIGINAL_PATH = "flood.original_path"
_ACCESS_LOGGER = "bentoml.access"


class _RestorePath:
    """Gives the application the path the metrics middleware relabelled."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if _ORIGINAL_PATH in scope:
            scope = dict(scope)
            scope["path"] = scope.pop(_ORIGINAL_PATH)
        await self.app(scope, receive, send)


def bound_request_metric_labels(known_paths: Iterable[str]) -> None:
    """Relabel requests to paths outside ``known_paths`` (plus BentoML's) as ``other`` in
    BentoML's request metrics. Call it where the service is defined: BentoML imports its
    metrics middleware class when a worker builds its app, after loading the service."""
    instruments = bentoml_internals.resolve("instruments")
    base = instruments.RunnerTrafficMetricsMiddleware
    if getattr(base, "flood_bounded", False):
        return
    known = frozenset(known_paths) | BENTOML_PATHS

    class BoundedTrafficMetrics(base):  # type: ignore[misc, valid-type]
        flood_bounded = True

        def __init__(self, app: ASGIApp, **options: Any) -> None:
            super().__init__(_RestorePath(app), **options)
            # The worker's own @bentoml.api routes (the model service's /predict).
            self._known = known | bentoml_internals.worker_service_routes()

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] in ("http", "websocket") and scope["path"] not in self._known:
                scope = {**scope, "path": OTHER_PATH_LABEL, _ORIGINAL_PATH: scope["path"]}
            await super().__call__(scope, receive, send)

    instruments.RunnerTrafficMetricsMiddleware = BoundedTrafficMetrics


def escape_control_characters(text: str) -> str:
    """``text`` with every control character (newlines included) as a visible escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class ControlCharacterEscaper(logging.Filter):
    """Renders a record's message with control characters escaped, so one record is one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        escaped = escape_control_characters(message)
        if escaped is not message:
            record.msg, record.args = escaped, None
        return True


def escape_access_log() -> None:
    """Install :class:`ControlCharacterEscaper` on BentoML's access logger (once)."""
    access = logging.getLogger(_ACCESS_LOGGER)
    if not any(isinstance(f, ControlCharacterEscaper) for f in access.filters):
        access.addFilter(ControlCharacterEscaper())
