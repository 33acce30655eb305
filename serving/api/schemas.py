"""The HTTP API's bodies: requests are ``core.observation.Observation`` (or a batch of them).

Every 4xx and 5xx the API sends has one shape, :class:`ErrorOut`:
``{"error": {"code": ..., "message": ..., "detail": ...}}``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.observation import Observation
from core.risk import RiskLevel

EXAMPLE_OBSERVATION: dict[str, Any] = {"temperature": 28, "humidity": 85, "rainfall": 50}
EXAMPLE_BATCH_OBSERVATION: dict[str, Any] = {
    "temperature": 27.5,
    "humidity": 92,
    "rainfall": 180,
    "rainfall_3d": 260,
    "month": 8,
}
# 48, not 64: batch rows are logged as "<request id>#<row>", and the log's column holds 64.
# '#' cannot occur in a request id, so a row id never collides with a request id.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,48}$"


class BatchRequest(BaseModel):
    """The body of ``POST /api/v1/predict/batch``."""

    model_config = ConfigDict(extra="forbid")

    observations: list[Observation]


class ModelRef(BaseModel):
    name: str
    version: int
    bento_tag: str


class Prediction(BaseModel):
    probability: float = Field(ge=0.0, le=1.0, description="P(flood) for the day")
    risk_level: RiskLevel
    model: ModelRef
    request_id: str = Field(description="the server's id for the request, the prediction log's key")
    client_request_id: str | None = Field(default=None, description="X-Request-ID as sent, if valid")


class BatchPrediction(BaseModel):
    predictions: list[Prediction]
    count: int
    request_id: str = Field(description="the server's id for the request, the prediction log's key")
    client_request_id: str | None = Field(default=None, description="X-Request-ID as sent, if valid")


class ThresholdsOut(BaseModel):
    alert: float
    critical: float
    rule: str
    # Measured out of year when the thresholds were chosen; null for older versions.
    alert_rate: float | None = Field(None, description="share of station-days at or above Alert")
    alert_recall: float | None = Field(None, description="share of flood days at or above Alert")
    critical_rate: float | None = Field(None, description="share of station-days at or above Critical")
    critical_recall: float | None = Field(None, description="share of flood days at or above Critical")


class ModelInfoOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    version: int
    bento_tag: str
    bento_model_tag: str
    run_id: str
    data_source: str
    sha256: str
    validation_status: str
    created_at: str
    engine: str
    thresholds: ThresholdsOut
    metrics: dict[str, float]


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable reason, e.g. invalid_observation, rate_limited")
    message: str = Field(description="what went wrong, for people")
    detail: Any = Field(None, description="per-field problems ({field, reason, type}) where there are any")


class ErrorOut(BaseModel):
    """Every 4xx and 5xx body the API sends."""

    error: ErrorDetail


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def request_body(model: type[BaseModel], *, examples: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI ``requestBody`` for a route that reads its body itself (to bound it and to
    check the key first), so FastAPI cannot infer it. The schema is inlined: a route's
    extra OpenAPI cannot add components."""
    schema = model.model_json_schema()
    inlined = _inline(schema, schema.get("$defs", {}))
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": inlined,
                    "examples": {name: {"value": value} for name, value in examples.items()},
                }
            },
        }
    }
