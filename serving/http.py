"""The HTTP edge: routes, input validation, error shapes, response headers.

Status codes are chosen here (and, for API keys and rate limits, in ``serving.operations``).
Bad input is always a 4xx with a field-level reason: malformed or too deeply nested JSON
400, a body or batch over the limit 413, invalid fields 422. A model that is not loaded
yet, or a batcher shedding load, is a 503 the client may retry. Browsers may call the API
only from the origins in CORS_ORIGINS.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import numpy as np
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.observation import FIELD_NAMES, Observation
from core.settings import get_settings
from ops.predictionlog import PredictionRecord
from serving.handover import DrainFlag
from serving.health import CheckResult, check_dependencies, overall_status
from serving.hooks import EdgeHooks, edge_headers
from serving.metrics import get_metrics
from serving.openapi import openapi_document
from serving.predictor import ServedModel
from serving.schemas import (
    REQUEST_ID_PATTERN,
    BatchPrediction,
    ModelInfoOut,
    ModelRef,
    Prediction,
    RiskLevel,
    ThresholdsOut,
)

logger = logging.getLogger(__name__)

MODEL_VERSION_HEADER = "X-Model-Version"
REQUEST_ID_HEADER = "X-Request-ID"
OPENAPI_PATH = "/api/v1/openapi.json"
# nginx's code for "client closed request"; only the access log ever sees it.
CLIENT_CLOSED_REQUEST = 499
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
_OBSERVATIONS = TypeAdapter(list[Observation])
_PROBE_ROW = np.array([[28.0, 85.0, 50.0] + [math.nan] * (len(FIELD_NAMES) - 3)])
# The largest body read is a full batch at 1 KiB per observation (a pretty-printed one with
# every field is about 300 bytes), so PREDICT_BATCH_MAX sets both limits.
_BODY_BYTES_PER_OBSERVATION = 1024
_BODY_BYTES_OVERHEAD = 4096
API_KEY_HEADER = "X-API-Key"


class Overloaded(Exception):
    """The model's batcher shed this request to keep latency within its deadline."""


class ModelUnavailable(Exception):
    """The model service dropped the call (its worker died and is being restarted)."""


class ModelBackend(Protocol):
    """What the edge needs from whoever holds the model (a BentoML service in production)."""

    @property
    def served(self) -> ServedModel: ...

    @property
    def bento_tag(self) -> str: ...

    @property
    def engine(self) -> str: ...

    async def predict_proba(self, raw: np.ndarray) -> np.ndarray:
        """P(flood) per raw row; raises ``Overloaded`` when load is shed and
        ``ModelUnavailable`` when the model service cannot be reached."""
        ...


BackendGetter = Callable[[], ModelBackend | None]


def observations_to_raw(observations: Sequence[Observation]) -> np.ndarray:
    """Validated observations as a raw matrix in ``FIELD_NAMES`` order, absent -> NaN."""
    rows = [[getattr(o, name) for name in FIELD_NAMES] for o in observations]
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(FIELD_NAMES))


def _json(body: BaseModel) -> Response:
    # pydantic's own serializer: a 256-row batch answer through json.dumps cost more CPU
    # than the model run.
    return Response(body.model_dump_json(), media_type="application/json")


def _error(status: int, message: str, detail: Any = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status)


def _validation_response(exc: ValidationError) -> JSONResponse:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return _error(400, "malformed JSON", [e["msg"] for e in errors])
    detail = [
        {"field": ".".join(str(p) for p in e["loc"]) or "(body)", "reason": e["msg"], "type": e["type"]}
        for e in errors
    ]
    return _error(422, "invalid observation", detail)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def body_limit_bytes() -> int:
    """The largest request body the API reads; larger ones are answered 413 unread."""
    return _BODY_BYTES_OVERHEAD + get_settings().predict_batch_max * _BODY_BYTES_PER_OBSERVATION


class BodyTooLarge(Exception):
    """The request body is over :func:`body_limit_bytes`."""


async def read_body(request: Request) -> bytes:
    """The body, read no further than :func:`body_limit_bytes` (Content-Length is only a hint)."""
    limit = body_limit_bytes()
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large() -> JSONResponse:
    return _error(413, f"request body over {body_limit_bytes()} bytes")


def _request_id(request: Request) -> str:
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


def log_row_ids(request_id: str, rows: int, *, batch: bool) -> list[str]:
    """Prediction-log ids: the request id for a single prediction, ``<id>#<row>`` in a batch."""
    return [f"{request_id}#{i}" for i in range(rows)] if batch else [request_id]


class Edge:
    """Route handlers bound to a model backend and the ops hooks."""

    def __init__(self, get_backend: BackendGetter, hooks_factory: Callable[[], EdgeHooks]) -> None:
        self._get_backend = get_backend
        # Asked on every request, never cached: the hooks belong to the service instance,
        # which does not exist yet when the app is built.
        self._hooks_factory = hooks_factory

    async def _guard(self, request: Request, hooks: EdgeHooks) -> Response | None:
        for guard in hooks.guards:
            answer = await guard(request)
            if answer is not None:
                return answer
        return None

    async def _charge(self, request: Request, hooks: EdgeHooks, *, route: str, rows: int) -> Response | None:
        for charge in hooks.charges:
            answer = await charge(request, route, rows)
            if answer is not None:
                return answer
        return None

    async def _predict(
        self, request: Request, hooks: EdgeHooks, observations: list[Observation], *, route: str
    ) -> list[Prediction] | Response:
        backend = self._get_backend()
        if backend is None:
            return _error(503, "model is not loaded yet")
        served = backend.served
        start = time.perf_counter()
        try:
            probabilities = await backend.predict_proba(observations_to_raw(observations))
        except Overloaded:
            response = _error(503, "overloaded, retry shortly")
            response.headers["Retry-After"] = "1"
            return response
        except ModelUnavailable:
            response = _error(503, "model service unavailable, retry shortly")
            response.headers["Retry-After"] = "1"
            return response
        metrics = get_metrics()
        metrics.prediction_latency.labels(route=route).observe(time.perf_counter() - start)
        request_id = request.state.request_id
        ref = ModelRef(name=served.name, version=served.version, bento_tag=backend.bento_tag)
        version = str(served.version)
        risk_level = served.thresholds.risk_level
        # Built without re-validation: every value is ours, and a batch answer is 256 rows.
        predictions = [
            Prediction.model_construct(
                probability=p,
                risk_level=cast(RiskLevel, risk_level(p)),
                model=ref,
                request_id=request_id,
            )
            for p in map(float, probabilities)
        ]
        for level, count in Counter(p.risk_level for p in predictions).items():
            metrics.predictions.labels(risk_level=level, model_version=version).inc(count)
        if hooks.listeners:
            now = datetime.now(UTC)
            latency_ms = (time.perf_counter() - request.state.started) * 1000.0
            ids = log_row_ids(request_id, len(predictions), batch=route == "predict_batch")
            records = [
                PredictionRecord(
                    request_id=row_id,
                    created_at=now,
                    key_id=getattr(request.state, "key_id", None),
                    inputs=o.model_dump(exclude_none=True),
                    probability=p.probability,
                    risk_level=p.risk_level,
                    model_version=version,
                    bento_tag=ref.bento_tag,
                    latency_ms=latency_ms,
                )
                for row_id, o, p in zip(ids, observations, predictions, strict=True)
            ]
            for listener in hooks.listeners:
                await listener(request, records)
        return predictions

    async def predict(self, request: Request) -> Response:
        request.state.request_id = _request_id(request)
        hooks = self._hooks_factory()
        if (refused := await self._guard(request, hooks)) is not None:
            return refused
        if (refused := await self._charge(request, hooks, route="predict", rows=1)) is not None:
            return refused
        try:
            observation = Observation.model_validate_json(await read_body(request))
        except BodyTooLarge:
            return _too_large()
        except ValidationError as exc:
            return _validation_response(exc)
        result = await self._predict(request, hooks, [observation], route="predict")
        if isinstance(result, Response):
            return result
        return _json(result[0])

    async def predict_batch(self, request: Request) -> Response:
        request.state.request_id = _request_id(request)
        hooks = self._hooks_factory()
        if (refused := await self._guard(request, hooks)) is not None:
            return refused
        try:
            body = json.loads(await read_body(request), parse_constant=_reject_constant)
        except BodyTooLarge:
            return _too_large()
        except RecursionError:
            return _error(400, "malformed JSON", ["nested too deeply"])
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(400, "malformed JSON", [str(exc)])
        if not isinstance(body, dict) or set(body) != {"observations"}:
            return _error(
                422,
                "invalid batch",
                [{"field": "(body)", "reason": 'expected {"observations": [...]}'}],
            )
        items = body["observations"]
        limit = get_settings().predict_batch_max
        if isinstance(items, list) and len(items) > limit:
            return _error(413, f"at most {limit} observations per batch, got {len(items)}")
        rows = len(items) if isinstance(items, list) else 1
        if (refused := await self._charge(request, hooks, route="predict_batch", rows=rows)) is not None:
            return refused
        try:
            observations = _OBSERVATIONS.validate_python(items)
        except ValidationError as exc:
            return _validation_response_batch(exc)
        result = await self._predict(request, hooks, observations, route="predict_batch")
        if isinstance(result, Response):
            return result
        out = BatchPrediction.model_construct(
            predictions=result, count=len(result), request_id=request.state.request_id
        )
        return _json(out)

    async def model_info(self, request: Request) -> Response:
        hooks = self._hooks_factory()
        if (refused := await self._guard(request, hooks)) is not None:
            return refused
        if (refused := await self._charge(request, hooks, route="model", rows=1)) is not None:
            return refused
        backend = self._get_backend()
        if backend is None:
            return _error(503, "model is not loaded yet")
        served = backend.served
        info = ModelInfoOut(
            name=served.name,
            version=served.version,
            bento_tag=backend.bento_tag,
            bento_model_tag=served.bento_model_tag,
            run_id=served.run_id,
            data_source=served.data_source,
            sha256=served.sha256,
            validation_status=served.validation_status,
            created_at=served.created_at,
            engine=backend.engine,
            thresholds=ThresholdsOut(
                alert=served.thresholds.alert,
                critical=served.thresholds.critical,
                rule=served.thresholds.rule,
                **{
                    name: None if math.isnan(value) else value
                    for name, value in served.thresholds.expected().items()
                },
            ),
            metrics=served.metrics,
        )
        return JSONResponse(info.model_dump())

    async def health(self, _: Request) -> Response:
        return JSONResponse({"status": "healthy"})

    async def openapi(self, _: Request) -> Response:
        return JSONResponse(openapi_document(get_settings()))

    async def _checks(self) -> list[CheckResult]:
        backend = self._get_backend()

        async def probe_model() -> None:
            if backend is None:
                raise RuntimeError("model is not loaded")
            await backend.predict_proba(_PROBE_ROW)

        settings = get_settings()
        return await check_dependencies(
            probe_model,
            database_url=settings.effective_database_url,
            redis_url=settings.redis_url,
            # Failing open, the service keeps serving without Redis: a replica that is not
            # ready would be taken out of rotation for nothing (all replicas share Redis).
            redis_required=settings.rate_limit_policy == "fail-closed",
        )

    async def health_detailed(self, _: Request) -> Response:
        hooks = self._hooks_factory()
        results, operations = await asyncio.gather(
            self._checks(), hooks.health() if hooks.health else _no_operations()
        )
        degraded = any(report.get("status") != "ok" for report in operations.values())
        body: dict[str, Any] = {
            "status": "degraded" if degraded else overall_status(results),
            "checks": {r.name: r.as_dict() for r in results},
        }
        if operations:
            body["operations"] = operations
        return JSONResponse(body)

    async def health_ready(self, _: Request) -> Response:
        results = await self._checks()
        blocking = [r for r in results if r.blocks_readiness]
        body = {
            "ready": not blocking,
            "checks": {r.name: r.as_dict() for r in results},
        }
        return JSONResponse(body, status_code=503 if blocking else 200)


async def _no_operations() -> dict[str, dict[str, Any]]:
    return {}


def _validation_response_batch(exc: ValidationError) -> JSONResponse:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    detail = [
        {
            "field": ".".join(str(p) for p in ("observations", *e["loc"])),
            "reason": e["msg"],
            "type": e["type"],
        }
        for e in errors
    ]
    return _error(422, "invalid observation", detail)


Handler = Callable[[Request], Awaitable[Response]]


def _sending_edge_headers(handler: Handler) -> Handler:
    async def handle(request: Request) -> Response:
        request.state.started = time.perf_counter()
        response = await handler(request)
        response.headers.update(edge_headers(request))
        return response

    return handle


def create_app(get_backend: BackendGetter, *, hooks_factory: Callable[[], EdgeHooks]) -> Starlette:
    """The API; ``hooks_factory`` gives the guards, charges and listeners for each request."""
    edge = Edge(get_backend, hooks_factory)
    routes = [
        Route("/api/v1/predict", _sending_edge_headers(edge.predict), methods=["POST"]),
        Route("/api/v1/predict/batch", _sending_edge_headers(edge.predict_batch), methods=["POST"]),
        Route("/api/v1/model", _sending_edge_headers(edge.model_info), methods=["GET"]),
        Route("/health", edge.health, methods=["GET"]),
        Route("/health/detailed", edge.health_detailed, methods=["GET"]),
        Route("/health/ready", edge.health_ready, methods=["GET"]),
        Route(OPENAPI_PATH, edge.openapi, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(CorsFromSettings)],
        exception_handlers={ClientDisconnect: _client_gone},
    )


async def _client_gone(request: Request, _: Exception) -> Response:
    # The client hung up while its body was being read: nobody will read this answer, and
    # a traceback per disconnect (load generators close mid-request) would bury real errors.
    logger.debug("client disconnected before its request was read: %s", request.url.path)
    return Response(status_code=CLIENT_CLOSED_REQUEST)


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
    """ASGI middleware stamping every response, BentoML's own routes included."""

    def __init__(self, app: ASGIApp, get_backend: BackendGetter) -> None:
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
