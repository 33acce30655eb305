"""What the HTTP API answers; requests are ``core.observation.Observation`` (or a list)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RiskLevel = Literal["Safe", "Alert", "Critical"]


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
