"""The API's OpenAPI document, built from the same pydantic models the routes validate with.

BentoML's ``/docs.json`` describes only its own routes; the API's routes are a Starlette app
mounted in the service, so the service publishes this document at ``/api/v1/openapi.json``
for clients and for the schema-driven tests (schemathesis).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from core.observation import Observation
from core.settings import Settings
from serving.schemas import (
    REQUEST_ID_PATTERN,
    BatchPrediction,
    BatchRequest,
    ErrorOut,
    ModelInfoOut,
    Prediction,
)

_REF = "#/components/schemas/{model}"
_MODELS: tuple[type[BaseModel], ...] = (
    Observation,
    BatchRequest,
    Prediction,
    BatchPrediction,
    ModelInfoOut,
    ErrorOut,
)
_OBJECT = {"type": "object"}
_TEXT = {"text/plain": {"schema": {"type": "string"}}}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {
        400: "malformed or too deeply nested JSON",
        401: "API key missing, unknown, revoked or expired",
        413: "body or batch over the limit, or a cost above the key's whole rate limit",
        422: "invalid fields, each with a reason",
        429: "rate limit reached; see Retry-After",
        503: "model not loaded, load shed, or a dependency needed to decide is down; retry",
    }
    return {str(status): _json(_ref(ErrorOut), reasons[status]) for status in statuses}


def _api_operation(summary: str, ok: dict[str, Any], *, body: type[BaseModel] | None) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "security": [{"ApiKey": []}, {"Bearer": []}],
        "parameters": [
            {
                "name": "X-Request-ID",
                "in": "header",
                "required": False,
                "description": "echoed and logged when it matches the pattern, else replaced",
                "schema": {"type": "string", "pattern": REQUEST_ID_PATTERN},
            }
        ],
        "responses": {"200": ok, **_errors(401, 429, 503)},
    }
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
        operation["responses"].update(_errors(400, 413, 422))
    return operation


def openapi_document(settings: Settings) -> dict[str, Any]:
    """OpenAPI 3.1 for every route the API service answers, BentoML's probes included."""
    _, definitions = models_json_schema([(model, "validation") for model in _MODELS], ref_template=_REF)
    schemas = definitions["$defs"]
    schemas["BatchRequest"]["properties"]["observations"]["maxItems"] = settings.predict_batch_max
    ok_text = {"200": {"description": "up", "content": _TEXT}}
    probe = {"get": {"summary": "BentoML probe", "responses": ok_text}}
    readyz = {
        "get": {"summary": "BentoML probe", "responses": {**ok_text, "503": {"description": "not ready"}}}
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Floodingnaque flood-risk API", "version": "1"},
        "paths": {
            "/api/v1/predict": {
                "post": _api_operation(
                    "P(flood) for one day", _json(_ref(Prediction), "the prediction"), body=Observation
                )
            },
            "/api/v1/predict/batch": {
                "post": _api_operation(
                    "P(flood) for up to PREDICT_BATCH_MAX days",
                    _json(_ref(BatchPrediction), "one prediction per observation, in order"),
                    body=BatchRequest,
                )
            },
            "/api/v1/model": {
                "get": _api_operation("the served model", _json(_ref(ModelInfoOut), "the model"), body=None)
            },
            "/health": {"get": {"summary": "liveness", "responses": {"200": _json(_OBJECT, "alive")}}},
            "/health/detailed": {
                "get": {"summary": "every dependency", "responses": {"200": _json(_OBJECT, "the checks")}}
            },
            "/health/ready": {
                "get": {
                    "summary": "readiness",
                    "responses": {"200": _json(_OBJECT, "ready"), "503": _json(_OBJECT, "not ready")},
                }
            },
            "/api/v1/openapi.json": {
                "get": {"summary": "this document", "responses": {"200": _json(_OBJECT, "OpenAPI 3.1")}}
            },
            "/livez": probe,
            "/healthz": probe,
            "/readyz": readyz,
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": {"description": "text format", "content": _TEXT}},
                }
            },
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "Bearer": {"type": "http", "scheme": "bearer"},
            },
        },
    }
