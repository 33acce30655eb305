"""The HTTP edge in-process: contracts, validation errors, health, the ops seam."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.testclient import TestClient

from core.settings import get_settings
from ops.predictionlog import PredictionRecord
from serving.hooks import EdgeHooks, edge_headers
from serving.http import MODEL_VERSION_HEADER, ResponseHeaders, create_app
from serving.predictor import Predictor, ServedModel, engine_for
from tests.conftest import POSTGRES_URL, REDIS_URL, require_service

DAY = {"temperature": 28, "humidity": 85, "rainfall": 50}


@dataclass
class LocalBackend:
    """The real model called directly, without the batcher (that is tested over HTTP)."""

    served: ServedModel
    predictor: Predictor
    engine: str
    bento_tag: str = "flood_risk:in-process"

    async def predict_proba(self, raw: np.ndarray) -> np.ndarray:
        return self.predictor.predict_proba(raw)


@pytest.fixture
def backend(served_model: tuple[ServedModel, Path], predictor: Predictor) -> LocalBackend:
    served, model_dir = served_model
    return LocalBackend(served=served, predictor=predictor, engine=engine_for(model_dir))


def make_client(app: Starlette, backend: LocalBackend | None) -> TestClient:
    return TestClient(ResponseHeaders(app, get_backend=lambda: backend), raise_server_exceptions=True)


@pytest.fixture
def client(backend: LocalBackend) -> Iterator[TestClient]:
    with make_client(create_app(lambda: backend, hooks_factory=EdgeHooks), backend) as test_client:
        yield test_client


def test_predict_answers_the_contract(client: TestClient, backend: LocalBackend) -> None:
    response = client.post("/api/v1/predict", json=DAY)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"probability", "risk_level", "model", "request_id"}
    expected = float(backend.predictor.predict_proba(np.array([[28, 85, 50] + [math.nan] * 4]))[0])
    assert body["probability"] == pytest.approx(expected)
    assert body["risk_level"] == backend.served.thresholds.risk_level(expected)
    assert body["model"] == {
        "name": backend.served.name,
        "version": backend.served.version,
        "bento_tag": backend.bento_tag,
    }
    assert response.headers[MODEL_VERSION_HEADER] == str(backend.served.version)


def test_request_id_is_echoed_when_sane_and_generated_otherwise(client: TestClient) -> None:
    given = client.post("/api/v1/predict", json=DAY, headers={"X-Request-ID": "abc-123"})
    assert given.json()["request_id"] == "abc-123"
    for odd in ("no spaces allowed", "x" * 49, "has#hash"):
        answer = client.post("/api/v1/predict", json=DAY, headers={"X-Request-ID": odd})
        assert answer.json()["request_id"] != odd and len(answer.json()["request_id"]) == 32


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


def test_batch_over_the_limit_is_413(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREDICT_BATCH_MAX", "4")
    get_settings.cache_clear()
    assert client.post("/api/v1/predict/batch", json={"observations": [DAY] * 4}).status_code == 200
    too_many = client.post("/api/v1/predict/batch", json={"observations": [DAY] * 5})
    assert too_many.status_code == 413
    assert "at most 4" in too_many.json()["error"]


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
    detail = response.json()["detail"]
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
    assert response.json()["detail"][0]["field"] == "observations.1.humidity"


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
    with make_client(create_app(lambda: None, hooks_factory=EdgeHooks), None) as no_model:
        assert no_model.post("/api/v1/predict", json=DAY).status_code == 503
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


def test_guards_charges_and_listeners_plug_in_without_touching_health(backend: LocalBackend) -> None:
    seen: list[PredictionRecord] = []
    charged: list[tuple[str, int]] = []

    async def deny_without_key(request: Request) -> Response | None:
        if request.headers.get("X-API-Key") != "k":
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        request.state.key_id = "fnq_000000000001"
        return None

    async def charge(request: Request, route: str, rows: int) -> Response | None:
        charged.append((route, rows))
        edge_headers(request)["X-RateLimit-Remaining"] = "7"
        return None

    async def record(_: Request, records: Sequence[PredictionRecord]) -> None:
        seen.extend(records)

    hooks = EdgeHooks(guards=[deny_without_key], charges=[charge], listeners=[record])
    app = create_app(lambda: backend, hooks_factory=lambda: hooks)
    with make_client(app, backend) as guarded:
        assert guarded.post("/api/v1/predict", json=DAY).status_code == 401
        assert guarded.get("/api/v1/model").status_code == 401
        assert guarded.get("/health").status_code == 200
        assert charged == []
        key = {"X-API-Key": "k"}
        ok = guarded.post("/api/v1/predict", json=DAY, headers=key)
        assert ok.status_code == 200 and ok.headers["X-RateLimit-Remaining"] == "7"
        batch = guarded.post(
            "/api/v1/predict/batch", json={"observations": [DAY, DAY]}, headers={**key, "X-Request-ID": "b1"}
        )
        assert batch.status_code == 200
    assert charged == [("predict", 1), ("predict_batch", 2)]
    assert [r.request_id for r in seen] == [ok.json()["request_id"], "b1#0", "b1#1"]
    first = seen[0]
    assert first.inputs == DAY and first.key_id == "fnq_000000000001"
    assert first.probability == ok.json()["probability"] and first.risk_level == ok.json()["risk_level"]
    assert first.model_version == str(backend.served.version) and first.bento_tag == backend.bento_tag
    assert first.latency_ms > 0


def test_a_client_that_hangs_up_mid_body_gets_no_traceback(
    backend: LocalBackend, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    app = create_app(lambda: backend, hooks_factory=EdgeHooks)
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
