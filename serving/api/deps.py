"""The edge's dependencies: the backend, the request id, the API key, its charge, the bodies.

A route lists them as ``Annotated`` parameters, and FastAPI resolves them in that order, so
a route that names ``CurrentKey`` before its body refuses a bad key before reading a byte,
and a body is read no further than its limit before it is parsed. Every dependency is
``async``: FastAPI runs plain ``def`` dependencies in its thread pool, a hop per request.
"""

from __future__ import annotations

import ipaddress
import re
import time
import uuid
from typing import Annotated, Any, Protocol, cast

import bentoml
import numpy as np
import pydantic_core
from bentoml.exceptions import BentoMLException
from fastapi import Depends, Header, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import TypeAdapter, ValidationError

from core.errors import InvalidInputError, ModelUnavailableError, TooLargeError, UnsupportedMediaTypeError
from core.observation import Observation
from core.settings import get_settings
from ops.keys import ApiKeyInfo
from serving.api.errors import response_headers
from serving.api.schemas import REQUEST_ID_PATTERN
from serving.operations import EdgeOperations
from serving.predictor import ServedModel

API_KEY_HEADER = "X-API-Key"
REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
_OBSERVATIONS = TypeAdapter(list[Observation])
# The largest body read is a full batch at 1 KiB per observation (a pretty-printed one with
# every field is about 300 bytes), so PREDICT_BATCH_MAX sets both limits.
_BODY_BYTES_PER_OBSERVATION = 1024
_BODY_BYTES_OVERHEAD = 4096


class ModelBackend(Protocol):
    """What the edge needs from the service holding the model (``FloodRiskAPI`` when served)."""

    @property
    def served(self) -> ServedModel: ...

    @property
    def bento_tag(self) -> str: ...

    @property
    def engine(self) -> str: ...

    @property
    def unavailable_reason(self) -> str | None:
        """Why this worker refuses every model request (its model failed a check), or None."""
        ...

    @property
    def operations(self) -> EdgeOperations | None:
        """Keys, limits and the prediction log; None runs the edge without them (tests)."""
        ...

    async def predict_proba(self, raw: np.ndarray) -> np.ndarray:
        """P(flood) per raw row; raises ``OverloadedError`` when load is shed and
        ``ModelUnavailableError`` when the model service cannot be reached."""
        ...


def find_backend() -> ModelBackend | None:
    """The running service instance (``bentoml.get_current_service``), None before it exists."""
    try:
        return cast(ModelBackend, bentoml.get_current_service())
    except BentoMLException:
        return None


async def current_backend() -> ModelBackend:
    """The service instance; 503 (``ModelUnavailableError``) while a worker is starting."""
    backend = find_backend()
    if backend is None:
        raise ModelUnavailableError("model is not loaded yet")
    if backend.unavailable_reason is not None:
        raise ModelUnavailableError(backend.unavailable_reason)
    return backend


async def optional_backend() -> ModelBackend | None:
    """The service instance if there is one yet: health answers either way."""
    return find_backend()


Backend = Annotated[ModelBackend, Depends(current_backend)]
OptionalBackend = Annotated[ModelBackend | None, Depends(optional_backend)]


async def request_id(
    request: Request,
    given: Annotated[
        str | None,
        Header(
            alias=REQUEST_ID_HEADER,
            description=f"echoed and logged beside the server's id when it matches {REQUEST_ID_PATTERN}",
        ),
    ] = None,
) -> str:
    """The server's id for this request, the prediction log's key; also starts its latency
    clock. A valid client X-Request-ID is kept beside it (``request.state.client_request_id``),
    echoed and logged, but never the key: a client repeating one id must not keep its
    predictions out of the log."""
    request.state.started = time.perf_counter()
    request.state.client_request_id = given if given and _REQUEST_ID.match(given) else None
    return uuid.uuid4().hex


RequestId = Annotated[str, Depends(request_id)]

# The key is read by ops.keys.extract_api_key from either header; these two exist for the
# OpenAPI document (Swagger's "Authorize"). As dependencies they cost ~135 us per request
# (FastAPI's security-scope resolution, measured), so only the rarely called model route
# declares them, which puts the schemes in the document's components, and the prediction
# routes reference them by name (SECURITY).
api_key_scheme = APIKeyHeader(
    name=API_KEY_HEADER, scheme_name="ApiKey", auto_error=False, description="an API key (flood keys create)"
)
bearer_scheme = HTTPBearer(
    scheme_name="Bearer", auto_error=False, description="the same API key as a bearer token"
)
SECURITY: list[dict[str, list[str]]] = [{"ApiKey": []}, {"Bearer": []}]
DocumentedKey = Annotated[str | None, Security(api_key_scheme)]
DocumentedBearer = Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)]


def client_address(request: Request) -> str:
    """Who sent the request, for limits on failed authentication: with TRUSTED_PROXY_HOPS
    proxies in front, the address the outermost one saw (each appends its peer to
    X-Forwarded-For, so the last hops entries are theirs); otherwise the peer. An entry that
    is not an IP address (forged, or a proxy that writes names) falls back to the peer."""
    peer = request.client.host if request.client is not None else "unknown"
    hops = get_settings().trusted_proxy_hops
    if hops == 0:
        return peer
    forwarded = [part.strip() for part in ",".join(request.headers.getlist("x-forwarded-for")).split(",")]
    forwarded = [part for part in forwarded if part]
    if len(forwarded) < hops:
        return peer
    try:
        return str(ipaddress.ip_address(forwarded[-hops]))
    except ValueError:
        return peer


async def authenticate(request: Request, backend: Backend) -> ApiKeyInfo | None:
    """The request's verified key; None when the edge runs without keys (bypass)."""
    operations = backend.operations
    if operations is None:
        return None
    info = await operations.authenticate(request.headers, client=client_address(request))
    request.state.key_id = info.key_id if info is not None else None
    return info


CurrentKey = Annotated[ApiKeyInfo | None, Depends(authenticate)]


async def _charge(
    request: Request, backend: ModelBackend, key: ApiKeyInfo | None, *, route: str, rows: int
) -> None:
    if key is None or backend.operations is None:  # no keys, no per-key limits
        return
    response_headers(request).update(await backend.operations.charge(key, route=route, rows=rows))


async def charge_one_predict(request: Request, backend: Backend, key: CurrentKey) -> None:
    await _charge(request, backend, key, route="predict", rows=1)


async def charge_one_model(request: Request, backend: Backend, key: CurrentKey) -> None:
    await _charge(request, backend, key, route="model", rows=1)


def body_limit_bytes() -> int:
    """The largest request body the API reads; larger ones are answered 413 unread."""
    return _BODY_BYTES_OVERHEAD + get_settings().predict_batch_max * _BODY_BYTES_PER_OBSERVATION


async def read_body(request: Request) -> bytes:
    """The body, read no further than :func:`body_limit_bytes` (Content-Length is only a hint).

    A body declared as anything but JSON is refused unread; one declared as nothing is read
    as JSON (curl and scripts often omit the header).
    """
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaTypeError(f"Content-Type {media_type!r} is not JSON; send application/json")
    limit = body_limit_bytes()
    too_large = TooLargeError(f"request body over {limit} bytes", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _invalid(exc: ValidationError, *, prefix: tuple[str, ...] = ()) -> InvalidInputError:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return InvalidInputError(
            "malformed JSON", detail=[e["msg"] for e in errors], code="malformed_json", malformed=True
        )
    detail: list[object] = [
        {
            "field": ".".join(str(p) for p in (*prefix, *e["loc"])) or "(body)",
            "reason": e["msg"],
            "type": e["type"],
        }
        for e in errors
    ]
    return InvalidInputError("invalid observation", detail=detail, code="invalid_observation")


async def observation_body(request: Request) -> Observation:
    """The single route's body: one observation."""
    try:
        return Observation.model_validate_json(await read_body(request))
    except ValidationError as exc:
        raise _invalid(exc) from None


async def _batch_items(request: Request) -> Any:
    """The batch body's ``observations``, parsed but not yet validated (rows are charged first)."""
    try:
        # pydantic's Rust parser: about 1 us per row less than json.loads on a 256-row batch.
        # It refuses NaN and Infinity, bytes that are not UTF-8, and nesting past its limit.
        body = pydantic_core.from_json(await read_body(request), allow_inf_nan=False)
    except ValueError as exc:
        raise InvalidInputError(
            "malformed JSON", detail=[str(exc)], code="malformed_json", malformed=True
        ) from None
    if not isinstance(body, dict) or set(body) != {"observations"}:
        detail: list[object] = [{"field": "(body)", "reason": 'expected {"observations": [...]}'}]
        raise InvalidInputError("invalid batch", detail=detail, code="invalid_batch")
    items = body["observations"]
    limit = get_settings().predict_batch_max
    if isinstance(items, list) and len(items) > limit:
        raise TooLargeError(
            f"at most {limit} observations per batch, got {len(items)}", code="batch_too_large"
        )
    return items


async def batch_body(
    request: Request, backend: Backend, key: CurrentKey, items: Annotated[Any, Depends(_batch_items)]
) -> list[Observation]:
    """The batch route's observations: charged by rows, then validated."""
    await _charge(
        request, backend, key, route="predict_batch", rows=len(items) if isinstance(items, list) else 1
    )
    try:
        return _OBSERVATIONS.validate_python(items)
    except ValidationError as exc:
        raise _invalid(exc, prefix=("observations",)) from None


ObservationBody = Annotated[Observation, Depends(observation_body)]
BatchBody = Annotated[list[Observation], Depends(batch_body)]
