"""What the HTTP API answers; requests are ``core.observation.Observation`` (or a list)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.observation import Observation

RiskLevel = Literal["Safe", "Alert", "Critical"]
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
    request_id: str


class BatchPrediction(BaseModel):
    predictions: list[Prediction]
    count: int
    request_id: str


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


class ErrorOut(BaseModel):
    """Every 4xx and 5xx body the API itself sends."""

    error: str
    reason: str | None = None
    detail: Any = None
