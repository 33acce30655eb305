"""``GET /api/v1/model``: which model answers, its thresholds and what they are expected to do."""

from __future__ import annotations

import math
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from serving.api.deps import Backend, CurrentKey, DocumentedBearer, DocumentedKey, charge_one_model
from serving.api.errors import error_responses
from serving.api.routes.predict import json_response
from serving.api.schemas import ModelInfoOut, ThresholdsOut

router = APIRouter(prefix="/api/v1", tags=["model"])


@router.get(
    "/model",
    summary="the served model",
    response_model=ModelInfoOut,
    responses=error_responses(401, 429, 503),
)
async def model_info(
    request: Request,
    _key: CurrentKey,
    _charged: Annotated[None, Depends(charge_one_model)],
    backend: Backend,
    _documented_key: DocumentedKey,  # the security schemes, for the document (serving.api.deps)
    _documented_bearer: DocumentedBearer,
) -> Response:
    """The registry version this Bento pins, its engine, thresholds with their expected
    alert rate and recall (measured out of year), and its validation metrics."""
    served = backend.served
    thresholds = served.thresholds
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
            alert=thresholds.alert,
            critical=thresholds.critical,
            rule=thresholds.rule,
            **{name: None if math.isnan(value) else value for name, value in thresholds.expected().items()},
        ),
        metrics=served.metrics,
    )
    return json_response(request, info)
