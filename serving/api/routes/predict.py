"""``POST /api/v1/predict`` and ``/api/v1/predict/batch``: P(flood), a risk level, the model."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel

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


def json_response(request: Request, body: BaseModel) -> Response:
    """``body`` through pydantic's own serializer, with the headers decided on the way.

    FastAPI's response_model path re-validates and goes through json.dumps; for a 256-row
    batch answer that cost more CPU than the model run. The route still declares the model.
    """
    return Response(body.model_dump_json(), media_type="application/json", headers=response_headers(request))


def observations_to_raw(observations: Sequence[Observation]) -> np.ndarray:
    """Validated observations as a raw matrix in ``FIELD_NAMES`` order, absent -> NaN."""
    rows = [[getattr(o, name) for name in FIELD_NAMES] for o in observations]
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(FIELD_NAMES))


def log_row_ids(request_id: str, rows: int, *, batch: bool) -> list[str]:
    """Prediction-log ids: the request id for a single prediction, ``<id>#<row>`` in a batch."""
    return [f"{request_id}#{i}" for i in range(rows)] if batch else [request_id]


async def predict_observations(
    request: Request,
    backend: ModelBackend,
    observations: list[Observation],
    *,
    request_id: str,
    route: str,
) -> list[Prediction]:
    """The model's answers for ``observations``, counted in the metrics and logged."""
    start = time.perf_counter()
    probabilities = await backend.predict_proba(observations_to_raw(observations))
    metrics = get_metrics()
    metrics.prediction_latency.labels(route=route).observe(time.perf_counter() - start)
    served = backend.served
    ref = ModelRef(name=served.name, version=served.version, bento_tag=backend.bento_tag)
    risk_level = served.thresholds.risk_level
    # Built without re-validation: every value is ours, and a batch answer is 256 rows.
    client_id = request.state.client_request_id
    predictions = [
        Prediction.model_construct(
            probability=p,
            risk_level=risk_level(p),
            model=ref,
            request_id=request_id,
            client_request_id=client_id,
        )
        for p in map(float, probabilities)
    ]
    version = str(served.version)
    for level, count in Counter(p.risk_level for p in predictions).items():
        metrics.predictions.labels(risk_level=level, model_version=version).inc(count)
    if backend.operations is not None:
        # Durable before answered (PREDICTION_LOG_DURABILITY): refused with a 503 when
        # nothing can keep the rows.
        await backend.operations.record(
            prediction_group(
                request,
                observations,
                predictions,
                request_id=request_id,
                batch=route != "predict",
                model=ref,
            )
        )
    return predictions


def prediction_group(
    request: Request,
    observations: Sequence[Observation],
    predictions: Sequence[Prediction],
    *,
    request_id: str,
    batch: bool,
    model: ModelRef,
) -> PredictionGroup:
    """The request's prediction-log rows, one object for all of them, with the model version
    they came from."""
    latency_ms = (time.perf_counter() - request.state.started) * 1000.0
    return PredictionGroup(
        request_id=request_id,
        created_at=datetime.now(UTC),
        key_id=getattr(request.state, "key_id", None),
        model_version=str(model.version),
        bento_tag=model.bento_tag,
        latency_ms=latency_ms,
        client_request_id=request.state.client_request_id,
        row_ids=tuple(log_row_ids(request_id, len(predictions), batch=batch)),
        inputs_json=tuple(o.model_dump_json(exclude_none=True) for o in observations),
        probabilities=tuple(p.probability for p in predictions),
        risk_levels=tuple(p.risk_level for p in predictions),
    )


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
    predictions = await predict_observations(
        request, backend, [observation], request_id=request_id, route="predict"
    )
    return json_response(request, predictions[0])


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
    predictions = await predict_observations(
        request, backend, observations, request_id=request_id, route="predict_batch"
    )
    return json_response(
        request,
        BatchPrediction.model_construct(
            predictions=predictions,
            count=len(predictions),
            request_id=request_id,
            client_request_id=request.state.client_request_id,
        ),
    )
