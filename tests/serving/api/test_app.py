"""The FastAPI edge in-process: contracts, validation errors, health, keys and the log."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from sqlalchemy import create_engine, select
from starlette.testclient import TestClient

from core.errors import ModelUnavailableError
from core.settings import get_settings
from ops.database import dispose_engines
from ops.migrations import upgrade_database
from ops.tables import PredictionLogRow
from serving.api.app import create_app
from serving.api.deps import current_backend, optional_backend
from serving.api.headers import MODEL_VERSION_HEADER, ResponseHeaders
from serving.api.schemas import BatchPrediction
from serving.operations import EdgeOperations
from serving.predictor import Predictor, ServedModel, engine_for
from tests.conftest import POSTGRES_URL, REDIS_URL, require_service
from tests.serving.conftest import TEST_TIERS, issue_key

DAY = {"temperature": 28, "humidity": 85, "rainfall": 50}


@dataclass
class LocalBackend:
    """The real model called directly, without the batcher (that is tested over HTTP);
    with ``operations`` None the edge runs without keys, limits and log."""

    served: ServedModel
    predictor: Predictor
    engine: str
    bento_tag: str = "flood_risk:in-process"
    operations: EdgeOperations | None = None
    unavailable_reason: str | None = None

    async def predict_proba(self, raw: np.ndarray) -> np.ndarray:
        return self.predictor.predict_proba(raw)


@pytest.fixture
def backend(served_model: tuple[ServedModel, Path], predictor: Predictor) -> LocalBackend:
    served, model_dir = served_model
    return LocalBackend(served=served, predictor=predictor, engine=engine_for(model_dir))


def serve_backend(app: FastAPI, backend: LocalBackend | None) -> ResponseHeaders:
    """``app`` answering from ``backend`` in place of the BentoML service (None: not loaded)."""

    async def given() -> LocalBackend:
        if backend is None:
            raise ModelUnavailableError("model is not loaded yet")
        return backend

    async def given_or_none() -> LocalBackend | None:
        return backend

    app.dependency_overrides[current_backend] = given
    app.dependency_overrides[optional_backend] = given_or_none
    return ResponseHeaders(app, get_backend=lambda: backend)


def make_client(backend: LocalBackend | None) -> TestClient:
    return TestClient(serve_backend(create_app(), backend), raise_server_exceptions=True)


@pytest.fixture
def client(backend: LocalBackend) -> Iterator[TestClient]:
    with make_client(backend) as test_client:
        yield test_client


def test_predict_answers_the_contract(client: TestClient, backend: LocalBackend) -> None:
    response = client.post("/api/v1/predict", json=DAY)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"probability", "risk_level", "model", "request_id", "client_request_id"}
    expected = float(backend.predictor.predict_proba(np.array([[28, 85, 50] + [math.nan] * 4]))[0])
    assert body["probability"] == pytest.approx(expected)
    assert body["risk_level"] == backend.served.thresholds.risk_level(expected)
    assert body["model"] == {
        "name": backend.served.name,
        "version": backend.served.version,
        "bento_tag": backend.bento_tag,
    }
    assert response.headers[MODEL_VERSION_HEADER] == str(backend.served.version)


def test_the_request_id_is_the_servers_and_a_sane_client_id_is_echoed_beside_it(client: TestClient) -> None:
    given = client.post("/api/v1/predict", json=DAY, headers={"X-Request-ID": "abc-123"}).json()
    again = client.post("/api/v1/predict", json=DAY, headers={"X-Request-ID": "abc-123"}).json()
    assert given["client_request_id"] == again["client_request_id"] == "abc-123"
    # The log's key is ours: a client repeating its id cannot make two answers share a row.
    assert given["request_id"] != again["request_id"] and len(given["request_id"]) == 32
    for odd in ("no spaces allowed", "x" * 49, "has#hash"):
        answer = client.post("/api/v1/predict", json=DAY, headers={"X-Request-ID": odd}).json()
        assert answer["client_request_id"] is None and len(answer["request_id"]) == 32


def test_batch_agrees_with_single_predictions(client: TestClient) -> None:
    days = [
        DAY,
        {"temperature": 27.5, "humidity": 92, "rainfall": 180, "rainfall_3d": 260, "month": 8},
        {"temperature": 31, "humidity": 60, "rainfall": 0, "wind_speed": 3.2, "month": 2},
    ]
    batch = client.post("/api/v1/predict/batch", json={"observations": days})
    assert batch.status_code == 200
    body = batch.json()
    assert body["count"] == 3
    for day, item in zip(days, body["predictions"], strict=True):
        single = client.post("/api/v1/predict", json=day).json()
        assert item["probability"] == single["probability"]
        assert item["risk_level"] == single["risk_level"]
        assert item["model"] == single["model"]


def test_the_batch_body_is_a_valid_batch_prediction_in_order(backend: LocalBackend) -> None:
    days = [DAY, {**DAY, "rainfall": 400}, {**DAY, "rainfall": 0}]
    with make_client(backend) as client:
        answer = client.post(
            "/api/v1/predict/batch", json={"observations": days}, headers={"X-Request-ID": "b-9"}
        )
    assert answer.status_code == 200
    batch = BatchPrediction.model_validate_json(answer.content)
    assert batch.count == 3 and batch.client_request_id == "b-9"
    assert [p.request_id for p in batch.predictions] == [batch.request_id] * 3
    raw = np.array([[d["temperature"], d["humidity"], d["rainfall"]] + [math.nan] * 4 for d in days])
    expected = backend.predictor.predict_proba(raw)
    assert [p.probability for p in batch.predictions] == pytest.approx(list(expected))


class NonFiniteBackend(LocalBackend):
    async def predict_proba(self, raw: np.ndarray) -> np.ndarray:
        return np.full(len(raw), math.nan)


def test_a_non_finite_probability_is_503_not_an_invalid_body(backend: LocalBackend) -> None:
    broken = NonFiniteBackend(served=backend.served, predictor=backend.predictor, engine=backend.engine)
    with make_client(broken) as client:
        for path, body in (("/api/v1/predict", DAY), ("/api/v1/predict/batch", {"observations": [DAY]})):
            refused = client.post(path, json=body)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "model_unavailable"


def test_batch_over_the_limit_is_413(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREDICT_BATCH_MAX", "4")
    get_settings.cache_clear()
    assert client.post("/api/v1/predict/batch", json={"observations": [DAY] * 4}).status_code == 200
    too_many = client.post("/api/v1/predict/batch", json={"observations": [DAY] * 5})
    assert too_many.status_code == 413
    assert too_many.json()["error"]["code"] == "batch_too_large"
    assert "at most 4" in too_many.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "field", "error_type"),
    [
        ({**DAY, "humidity": 101}, "humidity", "less_than_equal"),
        ({**DAY, "temperature": -11}, "temperature", "greater_than_equal"),
        ({**DAY, "rainfall": 1000.5}, "rainfall", "less_than_equal"),
        ({"temperature": 28, "humidity": 85}, "rainfall", "missing"),
        ({**DAY, "rain": 50}, "rain", "extra_forbidden"),
        ({**DAY, "humidity": "wet"}, "humidity", "float_parsing"),
        ({**DAY, "month": 13}, "month", "less_than_equal"),
        ({**DAY, "rainfall_3d": 10}, "(body)", "value_error"),
    ],
)
def test_invalid_fields_get_a_field_level_422(
    client: TestClient, body: dict[str, object], field: str, error_type: str
) -> None:
    response = client.post("/api/v1/predict", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_observation" and error["message"] == "invalid observation"
    detail = error["detail"]
    assert any(d["field"] == field and d["type"] == error_type for d in detail), detail


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b'{"temperature": 28, "humidity": 85', 400),
        (b"", 400),
        (b"not json", 400),
        (b'{"temperature": NaN, "humidity": 85, "rainfall": 50}', 422),
        (b'{"temperature": Infinity, "humidity": 85, "rainfall": 50}', 422),
        (b'{"temperature": 1e999, "humidity": 85, "rainfall": 50}', 422),
        (b"[1, 2, 3]", 422),
    ],
)
def test_malformed_or_non_finite_input_is_4xx(client: TestClient, raw: bytes, status: int) -> None:
    response = client.post("/api/v1/predict", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b'{"observations": [{"temperature": 28, "humidity": 85', 400),
        (b'{"observations": [{"temperature": NaN, "humidity": 85, "rainfall": 50}]}', 400),
        (b'[{"temperature": 28, "humidity": 85, "rainfall": 50}]', 422),
        (b'{"observations": [], "extra": 1}', 422),
        (b'{"observations": "many"}', 422),
    ],
)
def test_malformed_batches_are_4xx(client: TestClient, raw: bytes, status: int) -> None:
    response = client.post("/api/v1/predict/batch", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text


def test_batch_errors_name_the_item_and_field(client: TestClient) -> None:
    body = {"observations": [DAY, {**DAY, "humidity": -1}]}
    response = client.post("/api/v1/predict/batch", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["detail"][0]["field"] == "observations.1.humidity"


def test_model_route_reports_the_pinned_version(client: TestClient, backend: LocalBackend) -> None:
    body = client.get("/api/v1/model").json()
    served = backend.served
    assert body["version"] == served.version
    assert body["bento_model_tag"] == served.bento_model_tag
    assert body["thresholds"] == {
        "alert": served.thresholds.alert,
        "critical": served.thresholds.critical,
        "rule": served.thresholds.rule,
        **served.thresholds.expected(),
    }
    # What each level is expected to do out of year, stored with the version.
    assert 0 < body["thresholds"]["alert_rate"] <= 0.15
    assert 0 < body["thresholds"]["critical_rate"] <= 0.03
    assert body["data_source"] == served.data_source and body["metrics"] == served.metrics
    assert body["engine"] == "onnxruntime"


def test_no_model_means_503_not_500(backend: LocalBackend) -> None:
    with make_client(None) as no_model:
        refused = no_model.post("/api/v1/predict", json=DAY)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "model_unavailable"
        assert no_model.get("/api/v1/model").status_code == 503
        assert no_model.get("/health").json() == {"status": "healthy"}
        assert no_model.get("/health/ready").status_code == 503
        assert no_model.get("/health").headers[MODEL_VERSION_HEADER] == "unknown"


def test_health_reports_each_dependency(client: TestClient, flood_home: Path) -> None:
    flood_home.mkdir(parents=True)  # the default SQLite database lives there
    assert client.get("/health").json() == {"status": "healthy"}
    detailed = client.get("/health/detailed").json()
    assert detailed["status"] == "healthy", detailed
    assert detailed["checks"]["model"]["status"] == "healthy"
    assert detailed["checks"]["database"]["status"] == "healthy"
    assert detailed["checks"]["redis"]["status"] == "not_configured"
    assert all("latency_ms" in c for c in detailed["checks"].values())
    assert client.get("/health/ready").status_code == 200


@pytest.mark.postgres
@pytest.mark.redis
def test_health_with_real_postgres_and_redis(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    require_service("Redis", "127.0.0.1", 6379)
    monkeypatch.setenv("DATABASE_URL", POSTGRES_URL)
    monkeypatch.setenv("REDIS_URL", REDIS_URL)
    get_settings.cache_clear()
    detailed = client.get("/health/detailed").json()
    assert detailed["status"] == "healthy", detailed
    assert detailed["checks"]["redis"]["status"] == "healthy"
    assert client.get("/health/ready").status_code == 200


@pytest.mark.parametrize(("policy", "ready"), [("fail-open", 200), ("fail-closed", 503)])
def test_unreachable_redis_degrades_and_blocks_readiness_only_when_failing_closed(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, flood_home: Path, policy: str, ready: int
) -> None:
    flood_home.mkdir(parents=True)
    from tests.serving.conftest import free_port

    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("RATE_LIMIT_POLICY", policy)
    get_settings.cache_clear()
    detailed = client.get("/health/detailed").json()
    assert detailed["status"] == "degraded"
    assert detailed["checks"]["redis"]["status"] == "unhealthy"
    assert detailed["checks"]["redis"]["required"] is (policy == "fail-closed")
    assert detailed["checks"]["model"]["status"] == "healthy"
    # Failing open, every replica keeps serving without Redis; taking them all out of
    # rotation would turn a degraded limiter into an outage.
    assert client.get("/health/ready").status_code == ready
    # Liveness stays cheap and green: a restart would not fix Redis.
    assert client.get("/health").status_code == 200


def test_keys_limits_and_the_log_apply_to_the_api_and_never_to_health(
    backend: LocalBackend, flood_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real operations on SQLite: a key is checked before the body is read, charged by
    rows, and every answered prediction is logged with its model version."""
    monkeypatch.setenv("RATE_LIMIT_TIERS", json.dumps(TEST_TIERS))
    get_settings.cache_clear()
    settings = get_settings()
    upgrade_database(settings.effective_database_url)
    key = {"X-API-Key": issue_key(settings, tier="rows")}  # 10 per minute
    backend.operations = EdgeOperations.start(settings)
    try:
        with make_client(backend) as guarded:
            missing = guarded.post("/api/v1/predict", content=b"not even json")
            assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing"
            assert missing.headers["WWW-Authenticate"].startswith("Bearer")
            unknown = guarded.get("/api/v1/model", headers={"X-API-Key": "fnq_" + "0" * 40})
            assert unknown.status_code == 401 and unknown.json()["error"]["code"] == "unknown"
            assert guarded.get("/health").status_code == 200
            ok = guarded.post("/api/v1/predict", json=DAY, headers=key)
            assert ok.status_code == 200 and ok.headers["X-RateLimit-Remaining"] == "9"
            batch = guarded.post(
                "/api/v1/predict/batch",
                json={"observations": [DAY, DAY]},
                headers={**key, "X-Request-ID": "b1"},
            )
            assert batch.status_code == 200 and batch.headers["X-RateLimit-Remaining"] == "7"
            over = guarded.post("/api/v1/predict/batch", json={"observations": [DAY] * 8}, headers=key)
            assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limited"
            assert int(over.headers["Retry-After"]) > 0 and over.headers["X-RateLimit-Remaining"] == "7"
    finally:
        backend.operations.close()
    engine = create_engine(settings.effective_database_url)
    with engine.connect() as conn:
        rows = {r.request_id: r for r in conn.execute(select(PredictionLogRow.__table__))}
    engine.dispose()
    dispose_engines()
    batch_id = batch.json()["request_id"]
    assert set(rows) == {ok.json()["request_id"], f"{batch_id}#0", f"{batch_id}#1"}
    assert {rows[f"{batch_id}#{i}"].client_request_id for i in range(2)} == {"b1"}
    first = rows[ok.json()["request_id"]]
    assert first.probability == ok.json()["probability"] and first.risk_level == ok.json()["risk_level"]
    assert first.model_version == str(backend.served.version) and first.bento_tag == backend.bento_tag
    assert first.key_id is not None and first.latency_ms > 0


def test_a_client_that_hangs_up_mid_body_gets_no_traceback(
    backend: LocalBackend, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    app = serve_backend(create_app(), backend)
    sent: list[dict[str, object]] = []
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "path": "/api/v1/predict",
        "raw_path": b"/api/v1/predict",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 3000),
        "scheme": "http",
    }

    async def receive() -> dict[str, object]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


def test_every_error_has_one_shape_even_for_unknown_routes(client: TestClient) -> None:
    for answer in (
        client.get("/api/v1/nothing-here"),
        client.get("/api/v1/predict"),  # wrong method
        client.post("/api/v1/predict", json={**DAY, "humidity": 101}),
        client.post("/api/v1/predict", content=b"{", headers={"Content-Type": "application/json"}),
    ):
        assert answer.status_code in (400, 404, 405, 422), answer.text
        assert set(answer.json()) == {"error"}
        assert set(answer.json()["error"]) == {"code", "message", "detail"}
        assert answer.json()["error"]["code"] and answer.json()["error"]["message"]


def test_the_openapi_document_is_the_framework_s_and_describes_our_routes(client: TestClient) -> None:
    document = client.get("/api/v1/openapi.json").json()
    paths = document["paths"]
    assert {"/api/v1/predict", "/api/v1/predict/batch", "/api/v1/model", "/health/ready"} <= set(paths)
    predict = paths["/api/v1/predict"]["post"]
    body = predict["requestBody"]["content"]["application/json"]
    assert set(body["schema"]["required"]) == {"temperature", "humidity", "rainfall"}
    assert body["examples"]["a wet day"]["value"] == DAY
    assert client.post("/api/v1/predict", json=body["examples"]["a wet day"]["value"]).status_code == 200
    batch_body = paths["/api/v1/predict/batch"]["post"]["requestBody"]["content"]["application/json"]
    batch_schema = batch_body["schema"]
    assert batch_schema["properties"]["observations"]["items"]["properties"]["rainfall"]["maximum"] == 1000
    for status in ("401", "413", "422", "429", "503"):
        assert predict["responses"][status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorOut"
        }
    assert predict["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Prediction"
    }
    schemes = document["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"apiKey", "http"}
    for path, method in (
        ("/api/v1/predict", "post"),
        ("/api/v1/predict/batch", "post"),
        ("/api/v1/model", "get"),
    ):
        assert {name for requirement in paths[path][method]["security"] for name in requirement} == set(
            schemes
        )
    assert "X-Request-ID" in {p["name"] for p in predict["parameters"]}


@pytest.mark.security
@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
def test_bodies_declared_as_anything_but_json_are_415(client: TestClient, content_type: str) -> None:
    """Before: parsed as JSON whatever they said they were."""
    for path, body in (("/api/v1/predict", DAY), ("/api/v1/predict/batch", {"observations": [DAY]})):
        answer = client.post(path, content=json.dumps(body), headers={"Content-Type": content_type})
        assert answer.status_code == 415, answer.text
        assert answer.json()["error"]["code"] == "unsupported_media_type"
    for declared in ("application/json; charset=utf-8", "application/merge-patch+json"):
        ok = client.post("/api/v1/predict", content=json.dumps(DAY), headers={"Content-Type": declared})
        assert ok.status_code == 200, declared
    undeclared = client.post("/api/v1/predict", content=json.dumps(DAY).encode())
    assert undeclared.status_code == 200
