"""The HTTP edge: routes, input validation, error shapes, response headers.

Status codes are chosen here and only here. Bad input is always a 4xx with a field-level
reason: malformed JSON 400, a batch over the limit 413, invalid fields 422. A model that
is not loaded yet, or a batcher shedding load, is a 503 the client may retry.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

import numpy as np
from pydantic import TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.observation import FIELD_NAMES, Observation
from core.settings import get_settings
from serving.health import check_dependencies, overall_status
from serving.hooks import EdgeHooks, PredictionRecord, load_hooks
from serving.metrics import get_metrics
from serving.predictor import ServedModel
from serving.schemas import (
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
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_OBSERVATIONS = TypeAdapter(list[Observation])
_PROBE_ROW = np.array([[28.0, 85.0, 50.0] + [math.nan] * (len(FIELD_NAMES) - 3)])


class Overloaded(Exception):
    """The model's batcher shed this request to keep latency within its deadline."""


class ModelBackend(Protocol):
    """What the edge needs from whoever holds the model (a BentoML service in production)."""

    @property
    def served(self) -> ServedModel: ...

    @property
    def bento_tag(self) -> str: ...

    @property
    def engine(self) -> str: ...

    async def predict_proba(self, raw: np.ndarray) -> np.ndarray:
        """P(flood) per raw row; raises ``Overloaded`` when load is shed."""
        ...


BackendGetter = Callable[[], ModelBackend | None]


def observations_to_raw(observations: Sequence[Observation]) -> np.ndarray:
    """Validated observations as a raw matrix in ``FIELD_NAMES`` order, absent -> NaN."""
    rows = [[getattr(o, name) for name in FIELD_NAMES] for o in observations]
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(FIELD_NAMES))


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


def _request_id(request: Request) -> str:
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


class Edge:
    """Route handlers bound to a model backend and the ops hooks."""

    def __init__(self, get_backend: BackendGetter, hooks_factory: Callable[[], EdgeHooks]) -> None:
        self._get_backend = get_backend
        self._hooks_factory = hooks_factory
        self._hooks: EdgeHooks | None = None

    @property
    def hooks(self) -> EdgeHooks:
        if self._hooks is None:
            self._hooks = self._hooks_factory()
        return self._hooks

    async def _guard(self, request: Request) -> Response | None:
        for guard in self.hooks.guards:
            answer = await guard(request)
            if answer is not None:
                return answer
        return None

    async def _predict(
        self, request: Request, observations: list[Observation], *, route: str
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
        metrics = get_metrics()
        metrics.prediction_latency.labels(route=route).observe(time.perf_counter() - start)
        request_id = request.state.request_id
        ref = ModelRef(name=served.name, version=served.version, bento_tag=backend.bento_tag)
        predictions = []
        for p in probabilities:
            probability = float(p)
            level = cast(RiskLevel, served.thresholds.risk_level(probability))
            metrics.predictions.labels(risk_level=level, model_version=str(served.version)).inc()
            predictions.append(
                Prediction(probability=probability, risk_level=level, model=ref, request_id=request_id)
            )
        if self.hooks.listeners:
            records = [
                PredictionRecord(
                    request_id=request_id,
                    observation=o.model_dump(exclude_none=True),
                    probability=p.probability,
                    risk_level=p.risk_level,
                    model_version=served.version,
                )
                for o, p in zip(observations, predictions, strict=True)
            ]
            for listener in self.hooks.listeners:
                await listener(request, records)
        return predictions

    async def predict(self, request: Request) -> Response:
        request.state.request_id = _request_id(request)
        if (refused := await self._guard(request)) is not None:
            return refused
        try:
            observation = Observation.model_validate_json(await request.body())
        except ValidationError as exc:
            return _validation_response(exc)
        result = await self._predict(request, [observation], route="predict")
        if isinstance(result, Response):
            return result
        return JSONResponse(result[0].model_dump())

    async def predict_batch(self, request: Request) -> Response:
        request.state.request_id = _request_id(request)
        if (refused := await self._guard(request)) is not None:
            return refused
        try:
            body = json.loads(await request.body(), parse_constant=_reject_constant)
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
        try:
            observations = _OBSERVATIONS.validate_python(items)
        except ValidationError as exc:
            return _validation_response_batch(exc)
        result = await self._predict(request, observations, route="predict_batch")
        if isinstance(result, Response):
            return result
        out = BatchPrediction(predictions=result, count=len(result), request_id=request.state.request_id)
        return JSONResponse(out.model_dump())

    async def model_info(self, request: Request) -> Response:
        if (refused := await self._guard(request)) is not None:
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
            ),
            metrics=served.metrics,
        )
        return JSONResponse(info.model_dump())

    async def health(self, _: Request) -> Response:
        return JSONResponse({"status": "healthy"})

    async def _checks(self) -> list[Any]:
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
        )

    async def health_detailed(self, _: Request) -> Response:
        results = await self._checks()
        body = {
            "status": overall_status(results),
            "checks": {r.name: r.as_dict() for r in results},
        }
        return JSONResponse(body)

    async def health_ready(self, _: Request) -> Response:
        results = await self._checks()
        blocking = [r for r in results if r.blocks_readiness]
        body = {
            "ready": not blocking,
            "checks": {r.name: r.as_dict() for r in results},
        }
        return JSONResponse(body, status_code=503 if blocking else 200)


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


def create_app(
    get_backend: BackendGetter, *, hooks_factory: Callable[[], EdgeHooks] = load_hooks
) -> Starlette:
    edge = Edge(get_backend, hooks_factory)
    routes = [
        Route("/api/v1/predict", edge.predict, methods=["POST"]),
        Route("/api/v1/predict/batch", edge.predict_batch, methods=["POST"]),
        Route("/api/v1/model", edge.model_info, methods=["GET"]),
        Route("/health", edge.health, methods=["GET"]),
        Route("/health/detailed", edge.health_detailed, methods=["GET"]),
        Route("/health/ready", edge.health_ready, methods=["GET"]),
    ]
    return Starlette(routes=routes)


class ResponseHeaders:
    """ASGI middleware stamping every response, BentoML's own routes included."""

    def __init__(self, app: ASGIApp, get_backend: BackendGetter) -> None:
        self.app = app
        self._get_backend = get_backend

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
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
