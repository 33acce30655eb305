"""What keeps BentoML's own request metrics and access log safe from what clients send.

BentoML labels its request metrics with the raw request path, so every distinct path a
scanner tries (``/wp-admin``, ``/x1``, ``/x2``, ...) would add series to ``/metrics`` for
the life of the server, in memory and in the multiprocess files behind it. Its access log
writes the decoded path, so ``/x%0A<forged line>`` would start a line of its own.

:func:`bound_request_metric_labels` makes BentoML's metrics middleware label paths that no
route serves as ``other`` (the request itself still sees its real path, so it is answered
exactly as before); :class:`ControlCharacterEscaper` escapes control characters in
access-log lines.

Below the application, uvicorn (which serves every BentoML worker) bounds neither the size
of a request's headers nor the time a client takes to send them: httptools keeps appending
an unterminated header in memory, and a connection that sends nothing, or one byte at a
time, stays open for good. Neither BentoML's service config nor its worker's uvicorn.Config
can set such a bound (``serving.bentoml_internals``: ``api_worker``).
:func:`bound_http_requests` makes the workers speak HTTP through a subclass of uvicorn's
httptools protocol that refuses headers over a size (431, connection closed) and closes a
connection whose request headers are not complete in time.

Above the workers, BentoML's process manager (circus) takes commands such as "start this
process" on ZMQ TCP endpoints on 127.0.0.1, without authentication: any local user could
run a program as the server's user. :func:`run_arbiter_privately` moves both endpoints to
ipc (unix) sockets in a directory only the server's user can enter.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from serving import bentoml_internals

OTHER_PATH_LABEL = "other"
# BentoML's own routes on the API service (health probes, metrics, its docs).
BENTOML_PATHS = frozenset({"/livez", "/healthz", "/readyz", "/metrics", "/docs.json", "/docs", "/"})
_ORIGINAL_PATH = "flood.original_path"
_ACCESS_LOGGER = "bentoml.access"
# Not uvicorn.error: BentoML gives that logger a handler and lets it propagate to the root's
# identical one, so each of its lines is written twice.
logger = logging.getLogger(__name__)
_HEADERS_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
    b"request headers too large",
)


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


def bound_http_requests(*, max_header_bytes: int, header_timeout_s: float) -> None:
    """Make this process's uvicorn servers (BentoML's workers) refuse a request whose request
    line and headers pass ``max_header_bytes`` (431, then close) and close a connection that
    has not sent a request's complete headers ``header_timeout_s`` after it connected, or
    after that request's first byte. Idle keep-alive between requests is not affected.
    Call it where the service is defined, like :func:`bound_request_metric_labels`."""
    base = bentoml_internals.resolve("httptools_protocol")

    class BoundedHttpToolsProtocol(base):  # type: ignore[misc, valid-type]
        """Counts what it feeds the parser while a request's headers are still coming, and
        never feeds it more than ``max_header_bytes`` of them."""

        flood_max_header_bytes = max_header_bytes
        flood_header_timeout_s = header_timeout_s

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._flood_awaiting_headers = True
            self._flood_header_bytes = 0
            self._flood_request_begun = False
            self._flood_header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._flood_arm_header_timer()  # also closes a connection that sends nothing

        def connection_lost(self, exc: Exception | None) -> None:
            self._flood_cancel_header_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            # Past a request's headers: its body (capped by the app), then what follows it
            # in the same read; the next request's headers are counted from the next read.
            if not self._flood_awaiting_headers:
                super().data_received(data)
                return
            if self.transport.is_closing():
                return
            room = self.flood_max_header_bytes - self._flood_header_bytes
            if len(data) <= room:
                self._flood_header_bytes += len(data)
                super().data_received(data)
                return
            self._flood_header_bytes += room
            super().data_received(data[:room])
            if self.transport.is_closing():
                return
            if self._flood_awaiting_headers:
                self._flood_refuse_headers()
                return
            # The headers ended within the limit: the rest is their body (or pipelined requests).
            self.data_received(data[room:])

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._flood_request_begun = True
            # A request's first byte: on a keep-alive connection its headers' deadline starts
            # here (on a new one it runs since the connection was made).
            self._flood_arm_header_timer()

        def on_headers_complete(self) -> None:
            self._flood_awaiting_headers = False
            self._flood_request_begun = False
            self._flood_cancel_header_timer()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            # What arrives next is the next request's headers.
            self._flood_awaiting_headers = True
            self._flood_header_bytes = 0

        def _flood_arm_header_timer(self) -> None:
            if self._flood_header_timer is None and not self.transport.is_closing():
                self._flood_header_timer = self.loop.call_later(
                    self.flood_header_timeout_s, self._flood_header_timeout
                )

        def _flood_cancel_header_timer(self) -> None:
            if self._flood_header_timer is not None:
                self._flood_header_timer.cancel()
                self._flood_header_timer = None

        def _flood_header_timeout(self) -> None:
            self._flood_header_timer = None
            if self.transport.is_closing():
                return
            if self._flood_request_begun:  # a connection that sent nothing is a probe's or a preconnect
                logger.warning(
                    "request headers not complete within %ss: connection closed", self.flood_header_timeout_s
                )
            self.transport.close()

        def _flood_refuse_headers(self) -> None:
            logger.warning("request headers over %d bytes: refused with 431", self.flood_max_header_bytes)
            status, body = _HEADERS_TOO_LARGE
            content = [status]
            for name, value in self.server_state.default_headers:
                content.extend([name, b": ", value, b"\r\n"])
            content.extend(
                [
                    b"content-type: text/plain; charset=utf-8\r\n",
                    b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
            self.transport.write(b"".join(content))
            self.transport.close()

    bentoml_internals.serve_http_with(BoundedHttpToolsProtocol)


def run_arbiter_privately() -> None:
    """Every arbiter this process builds listens on ipc sockets in its own 0700 directory
    (removed when it stops) instead of the TCP ports BentoML gives it. Call it where the
    service is defined: ``bentoml serve`` loads the service before it builds the arbiter."""
    arbiter = bentoml_internals.resolve("arbiter")
    original = arbiter.__init__
    if getattr(original, "flood_private", False):
        return

    def private_init(
        self: Any, watchers: Any, endpoint: str, pubsub_endpoint: str, *args: Any, **kwargs: Any
    ) -> None:
        # mkdtemp makes the directory 0700 and owned by this user, so no other (non-root)
        # user can reach the sockets inside it whatever their own modes.
        directory = tempfile.mkdtemp(prefix="flood-arbiter-")
        logger.debug(
            "process manager endpoints moved from %s, %s to %s", endpoint, pubsub_endpoint, directory
        )
        original(self, watchers, f"ipc://{directory}/control", f"ipc://{directory}/events", *args, **kwargs)
        self.exit_stack.callback(shutil.rmtree, directory, ignore_errors=True)

    private_init.flood_private = True  # type: ignore[attr-defined]
    arbiter.__init__ = private_init
