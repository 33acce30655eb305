"""``POST /api/v1/predict`` and ``/api/v1/predict/batch``: P(flood), a risk level, the model."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, TypeAdapter

from core.errors import ModelUnavailableError
from core.observation import FIELD_NAMES, Observation
from ops.predictionlog import PredictionGroup
from serving.api.deps import (
    SECURITY,
    Backend,
    BatchBody,
    CurrentKey,
    ModelBackend,
    ObservationBody,
    RequestId,
    charge_one_predict,
)
from serving.api.errors import error_responses, response_headers
from serving.api.schemas import (
    EXAMPLE_BATCH_OBSERVATION,
    EXAMPLE_OBSERVATION,
    BatchPrediction,
    BatchRequest,
    ModelRef,
    Prediction,
    request_body,
)
from serving.metrics import get_metrics

router = APIRouter(prefix="/api/v1", tags=["predictions"])
EXAMPLE_BATCH = [EXAMPLE_OBSERVATION, EXAMPLE_BATCH_OBSERVATION]
_REFUSALS = error_responses(400, 401, 413, 415, 422, 429, 503)
_IDS = TypeAdapter(dict[str, str | None])
_LEVEL = TypeAdapter(str)


def json_response(request: Request, body: BaseModel | str) -> Response:
    """``body`` through pydantic's own serializer (or JSON text already written), with the
    headers decided on the way.

    FastAPI's response_model path re-validates and goes through json.dumps; for a 256-row
    batch answer that cost more CPU than the model run. The route still declares the model.
    """
    text = body if isinstance(body, str) else body.model_dump_json()
    return Response(text, media_type="application/json", headers=response_headers(request))


def observations_to_raw(observations: Sequence[Observation]) -> np.ndarray:
    """Validated observations as a raw matrix in ``FIELD_NAMES`` order, absent -> NaN."""
    rows = [[getattr(o, name) for name in FIELD_NAMES] for o in observations]
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(FIELD_NAMES))


def log_row_ids(request_id: str, rows: int, *, batch: bool) -> list[str]:
    """Prediction-log ids: the request id for a single prediction, ``<id>#<row>`` in a batch."""
    return [f"{request_id}#{i}" for i in range(rows)] if batch else [request_id]


@dataclass(frozen=True)
class Answers:
    """A request's predictions, row by row, and the model that made them."""

    probabilities: list[float]
    risk_levels: list[str]
    model: ModelRef


async def predict_observations(
    request: Request,
    backend: ModelBackend,
    observations: list[Observation],
    *,
    request_id: str,
    route: str,
) -> Answers:
    """The model's answers for ``observations``, counted in the metrics and logged."""
    start = time.perf_counter()
    probabilities = await backend.predict_proba(observations_to_raw(observations))
    metrics = get_metrics()
    metrics.prediction_latency.labels(route=route).observe(time.perf_counter() - start)
    if not np.isfinite(probabilities).all():
        # Never seen; answering would send a number JSON cannot carry (see predictions_json).
        raise ModelUnavailableError("the model returned a non-finite probability")
    served = backend.served
    floats = [float(p) for p in probabilities]
    answers = Answers(
        probabilities=floats,
        risk_levels=[served.thresholds.risk_level(p) for p in floats],
        model=ModelRef(name=served.name, version=served.version, bento_tag=backend.bento_tag),
    )
    version = str(served.version)
    for level, count in Counter(answers.risk_levels).items():
        metrics.predictions.labels(risk_level=level, model_version=version).inc(count)
    if backend.operations is not None:
        # Durable before answered (PREDICTION_LOG_DURABILITY): refused with a 503 when
        # nothing can keep the rows.
        await backend.operations.record(
            prediction_group(request, observations, answers, request_id=request_id, batch=route != "predict")
        )
    return answers


def prediction_group(
    request: Request,
    observations: Sequence[Observation],
    answers: Answers,
    *,
    request_id: str,
    batch: bool,
) -> PredictionGroup:
    """The request's prediction-log rows, one object for all of them, with the model version
    they came from."""
    latency_ms = (time.perf_counter() - request.state.started) * 1000.0
    return PredictionGroup(
        request_id=request_id,
        created_at=datetime.now(UTC),
        key_id=getattr(request.state, "key_id", None),
        model_version=str(answers.model.version),
        bento_tag=answers.model.bento_tag,
        latency_ms=latency_ms,
        client_request_id=request.state.client_request_id,
        row_ids=tuple(log_row_ids(request_id, len(answers.probabilities), batch=batch)),
        inputs_json=tuple(o.model_dump_json(exclude_none=True) for o in observations),
        probabilities=tuple(answers.probabilities),
        risk_levels=tuple(answers.risk_levels),
    )


def _ids_json(request_id: str, client_request_id: str | None) -> str:
    """``"request_id":...,"client_request_id":...`` as pydantic writes them."""
    return _IDS.dump_json({"request_id": request_id, "client_request_id": client_request_id}).decode()[1:-1]


def predictions_json(answers: Answers, *, request_id: str, client_request_id: str | None) -> list[str]:
    """Each row as the JSON of its :class:`Prediction`, in the model's field order."""
    return _rows_json(answers, _ids_json(request_id, client_request_id))


def batch_json(answers: Answers, *, request_id: str, client_request_id: str | None) -> str:
    """The JSON of the :class:`BatchPrediction` of ``answers``, in the model's field order."""
    ids = _ids_json(request_id, client_request_id)
    rows = _rows_json(answers, ids)
    return f'{{"predictions":[{",".join(rows)}],"count":{len(rows)},{ids}}}'


def _rows_json(answers: Answers, ids: str) -> list[str]:
    """Rows differ only in probability and risk level, so pydantic writes the rest (model and
    ids) once and each row is one string format: a model instance per row and its serializer
    cost more than the model run on a 256-row batch. ``repr`` of a finite float is a JSON
    number, and the probabilities were checked finite. Tests compare the result with
    pydantic's own ``model_dump_json`` field for field.
    """
    shared = f'"model":{answers.model.model_dump_json()},{ids}}}'
    levels = {level: _LEVEL.dump_json(level).decode() for level in set(answers.risk_levels)}
    return [
        f'{{"probability":{p!r},"risk_level":{levels[level]},{shared}'
        for p, level in zip(answers.probabilities, answers.risk_levels, strict=True)
    ]


@router.post(
    "/predict",
    summary="P(flood) for one day",
    response_model=Prediction,
    responses=_REFUSALS,
    openapi_extra={
        **request_body(Observation, examples={"a wet day": EXAMPLE_OBSERVATION}),
        "security": SECURITY,
    },
)
async def predict(
    request: Request,
    request_id: RequestId,
    _key: CurrentKey,
    _charged: Annotated[None, Depends(charge_one_predict)],
    observation: ObservationBody,
    backend: Backend,
) -> Response:
    """One day's weather: its flood probability, risk level (Safe / Alert / Critical) and
    the model version that answered. The key is checked and charged before the body is read."""
    answers = await predict_observations(
        request, backend, [observation], request_id=request_id, route="predict"
    )
    (body,) = predictions_json(
        answers, request_id=request_id, client_request_id=request.state.client_request_id
    )
    return json_response(request, body)


@router.post(
    "/predict/batch",
    summary="P(flood) for up to PREDICT_BATCH_MAX days (256 by default)",
    response_model=BatchPrediction,
    responses=_REFUSALS,
    openapi_extra={
        **request_body(
            BatchRequest,
            examples={"two days": {"observations": [EXAMPLE_OBSERVATION, EXAMPLE_BATCH_OBSERVATION]}},
        ),
        "security": SECURITY,
    },
)
async def predict_batch(
    request: Request, request_id: RequestId, _key: CurrentKey, observations: BatchBody, backend: Backend
) -> Response:
    """One prediction per observation, in order. A batch costs one rate-limit unit per row
    (times the route's weight); over the limit, the whole batch is refused."""
    answers = await predict_observations(
        request, backend, observations, request_id=request_id, route="predict_batch"
    )
    body = batch_json(answers, request_id=request_id, client_request_id=request.state.client_request_id)
    return json_response(request, body)
