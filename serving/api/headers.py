"""Response headers on every answer: the model version, CORS, and the handover's drain.

:class:`ResponseHeaders` wraps the whole service (BentoML's own routes included), so even a
probe says which model version is serving. :class:`CorsFromSettings` wraps the API app.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.settings import get_settings
from serving.api.deps import API_KEY_HEADER, REQUEST_ID_HEADER, ModelBackend
from serving.handover import DrainFlag

MODEL_VERSION_HEADER = "X-Model-Version"


class CorsFromSettings:
    """CORS for the origins in CORS_ORIGINS, none by default (no CORS headers: browsers then
    refuse cross-origin calls). Built on the first request, so settings are read in the
    worker rather than when the service module is imported."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._handler: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._handler is None:
            origins = get_settings().cors_origins
            self._handler = (
                CORSMiddleware(
                    self.app,
                    allow_origins=origins,
                    allow_methods=["GET", "POST"],
                    allow_headers=[API_KEY_HEADER, "Authorization", "Content-Type", REQUEST_ID_HEADER],
                    expose_headers=[
                        MODEL_VERSION_HEADER,
                        "X-RateLimit-Limit",
                        "X-RateLimit-Remaining",
                        "X-RateLimit-Reset",
                        "Retry-After",
                    ],
                    max_age=600,
                )
                if origins
                else self.app
            )
        await self._handler(scope, receive, send)


class ResponseHeaders:
    """ASGI middleware stamping every response with the model version (and, while the server
    is being replaced, ``Connection: close``)."""

    def __init__(self, app: ASGIApp, get_backend: Callable[[], ModelBackend | None]) -> None:
        self.app = app
        self._get_backend = get_backend
        self._drain = DrainFlag()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                backend = self._get_backend()
                version = str(backend.served.version) if backend is not None else "unknown"
                headers = list(message.get("headers", []))
                headers.append((MODEL_VERSION_HEADER.lower().encode(), version.encode()))
                if self._drain.draining():
                    # Being replaced (serving.handover): keep-alive clients reconnect after
                    # this answer, to the new server, instead of racing an idle close.
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
