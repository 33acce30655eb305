"""Where domain exceptions become HTTP answers: one status per class, one body shape for all.

Bad input is a 4xx with a reason, never a 5xx: malformed or too deeply nested JSON 400, an
API key 401, a body, batch or cost over its limit 413, a body declared as anything but JSON
415, invalid fields 422, a rate limit 429.
503 (with Retry-After) means retry: the model is not loaded, load was shed, or a dependency
needed to decide is down. Every body is ``{"error": {"code", "message", "detail"}}``.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from core.errors import (
    AuthenticationError,
    DependencyUnavailableError,
    FloodError,
    InvalidInputError,
    ModelUnavailableError,
    OverloadedError,
    RateLimitedError,
    TooLargeError,
    UnsupportedMediaTypeError,
)
from serving.api.schemas import ErrorOut

logger = logging.getLogger(__name__)

AUTH_CHALLENGE = 'Bearer realm="flood-risk", charset="UTF-8"'
# nginx's code for "client closed request"; only the access log ever sees it.
CLIENT_CLOSED_REQUEST = 499
RETRY_SOON_S = "1"
RETRY_DEPENDENCY_S = "5"

# What each status means on this API, for the OpenAPI document.
STATUS_MEANINGS = {
    400: "malformed or too deeply nested JSON",
    401: "API key missing, unknown, revoked or expired",
    413: "body or batch over the limit, or a cost above the key's whole rate limit",
    415: "the body is declared as something other than JSON (Content-Type)",
    422: "invalid fields, each with a reason",
    429: "rate limit reached; see Retry-After",
    503: "model not loaded, load shed, or a dependency needed to decide is down; retry",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these statuses, all with the error body."""
    return {status: {"model": ErrorOut, "description": STATUS_MEANINGS[status]} for status in statuses}


def response_headers(request: Request) -> dict[str, str]:
    """Headers decided while handling the request (rate-limit state) that every answer carries."""
    headers: dict[str, str] | None = getattr(request.state, "response_headers", None)
    if headers is None:
        headers = {}
        request.state.response_headers = headers
    return headers


def error_response(
    request: Request,
    status: int,
    *,
    code: str,
    message: str,
    detail: Any = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "detail": detail}}
    return JSONResponse(body, status_code=status, headers={**response_headers(request), **(headers or {})})


def _status_of(exc: FloodError) -> tuple[int, str, dict[str, str]]:
    """(status, code, headers) for a domain exception the edge answers."""
    match exc:
        case InvalidInputError():
            return (400 if exc.malformed else 422), exc.code, {}
        case AuthenticationError():
            return 401, exc.reason, {"WWW-Authenticate": AUTH_CHALLENGE}
        case TooLargeError():
            return 413, exc.code, exc.headers
        case UnsupportedMediaTypeError():
            return 415, "unsupported_media_type", {}
        case RateLimitedError():
            return 429, "rate_limited", exc.headers
        case OverloadedError():
            return 503, "overloaded", {"Retry-After": RETRY_SOON_S}
        case ModelUnavailableError():
            return 503, "model_unavailable", {"Retry-After": RETRY_SOON_S}
        case DependencyUnavailableError():
            return 503, "unavailable", {"Retry-After": RETRY_DEPENDENCY_S}
    # Not a refusal of this request (a configuration or registry error mid-request): ours,
    # so a 500, logged with its traceback, in the same shape.
    logger.error("unexpected %s answering a request", type(exc).__name__, exc_info=exc)
    return 500, "internal_error", {}


async def _on_flood_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FloodError)
    status, code, headers = _status_of(exc)
    detail = exc.detail if isinstance(exc, InvalidInputError) else None
    message = "internal error" if code == "internal_error" else str(exc)
    return error_response(request, status, code=code, message=message, detail=detail, headers=headers)


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    phrase = HTTPStatus(exc.status_code).phrase
    return error_response(
        request,
        exc.status_code,
        code=phrase.lower().replace(" ", "_"),
        message=str(exc.detail) if exc.detail else phrase,
        headers=dict(exc.headers or {}),
    )


async def _on_request_validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    detail = [
        {"field": ".".join(str(p) for p in e["loc"]), "reason": e["msg"], "type": e["type"]}
        for e in exc.errors()
    ]
    return error_response(request, 422, code="invalid_request", message="invalid request", detail=detail)


async def _on_client_gone(request: Request, _: Exception) -> Response:
    # The client hung up while its body was being read: nobody will read this answer, and
    # a traceback per disconnect (load generators close mid-request) would bury real errors.
    logger.debug("client disconnected before its request was read: %s", request.url.path)
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(FloodError, _on_flood_error)
    app.add_exception_handler(HTTPException, _on_http_exception)
    app.add_exception_handler(RequestValidationError, _on_request_validation)
    app.add_exception_handler(ClientDisconnect, _on_client_gone)
