"""The API as a FastAPI app, mounted in the Bento's API service (``serving.services``).

FastAPI writes the OpenAPI document from the routes (``/api/v1/openapi.json``), and BentoML
merges it into its own ``/docs.json``, so the Swagger UI at ``/`` lists our routes. Both
document pages of FastAPI are off: BentoML's UI at ``/`` is the one.
"""

from __future__ import annotations

from fastapi import FastAPI

from serving.api.errors import install_error_handlers
from serving.api.headers import CorsFromSettings
from serving.api.routes import health, model, predict

OPENAPI_PATH = "/api/v1/openapi.json"
DESCRIPTION = """Flood-risk prediction for Parañaque City from one day of weather.

Send an API key as `X-API-Key` (or `Authorization: Bearer`). Every answer names the model
version it came from. Every error body is `{"error": {"code", "message", "detail"}}`.
"""


def create_app() -> FastAPI:
    app = FastAPI(
        title="Floodingnaque flood-risk API",
        version="1",
        description=DESCRIPTION,
        openapi_url=OPENAPI_PATH,
        docs_url=None,
        redoc_url=None,
    )
    app.include_router(predict.router)
    app.include_router(model.router)
    app.include_router(health.router)
    install_error_handlers(app)
    app.add_middleware(CorsFromSettings)
    return app
