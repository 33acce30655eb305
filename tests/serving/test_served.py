"""Over real HTTP: the newest Bento served by ``bentoml serve`` on a free loopback port."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest

from tests.serving.conftest import BuiltHome, Server, start_server, stop_server
from tests.serving.load import post_many

pytestmark = [pytest.mark.serve, pytest.mark.slow]

DAY = {"temperature": 28, "humidity": 85, "rainfall": 50}


def metric_total(text: str, name: str) -> float:
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    return sum(float(m.group(2)) for m in pattern.finditer(text))


def test_every_route_answers_with_the_pinned_model(server: Server, built_home: BuiltHome) -> None:
    version = max(built_home.bentos)
    with httpx.Client(base_url=server.url, timeout=10, headers=built_home.auth) as client:
        predict = client.post("/api/v1/predict", json=DAY)
        assert predict.status_code == 200
        body = predict.json()
        assert body["model"] == {"name": "flood-risk", "version": version, "bento_tag": server.bento.tag}
        assert body["risk_level"] in {"Safe", "Alert", "Critical"}
        assert 0.0 <= body["probability"] <= 1.0

        model = client.get("/api/v1/model").json()
        assert model["version"] == version
        assert model["bento_model_tag"] == built_home.model_tags[version]
        assert model["engine"] == "onnxruntime"
        assert model["data_source"] == "synthetic"

        assert client.get("/health").json() == {"status": "healthy"}
        detailed = client.get("/health/detailed").json()
        assert detailed["status"] == "healthy", detailed
        assert set(detailed["checks"]) == {"model", "database", "redis"}
        assert detailed["operations"]["rate_limiter"]["backend"] == "memory"
        assert detailed["operations"]["prediction_log"]["status"] == "ok"
        assert client.get("/health/ready").status_code == 200
        for path in ("/livez", "/readyz", "/metrics"):
            response = client.get(path)
            assert response.status_code == 200, path
            assert response.headers["X-Model-Version"] == str(version), path
        assert predict.headers["X-Model-Version"] == str(version)


def test_bad_input_is_4xx_over_http(server: Server, built_home: BuiltHome) -> None:
    with httpx.Client(base_url=server.url, timeout=10, headers=built_home.auth) as client:
        bad_json = client.post("/api/v1/predict", content=b"{", headers={"Content-Type": "application/json"})
        assert bad_json.status_code == 400
        invalid = client.post("/api/v1/predict", json={**DAY, "humidity": 120})
        assert invalid.status_code == 422
        assert invalid.json()["error"]["detail"][0]["field"] == "humidity"
        unknown = client.post("/api/v1/predict", json={**DAY, "rain": 3})
        assert unknown.status_code == 422
        too_many = client.post("/api/v1/predict/batch", json={"observations": [DAY] * 257})
        assert too_many.status_code == 413


def test_single_and_batch_agree_over_http(server: Server, built_home: BuiltHome) -> None:
    days = [DAY, {**DAY, "rainfall": 220, "rainfall_3d": 300, "month": 9}, {**DAY, "rainfall": 0}]
    with httpx.Client(base_url=server.url, timeout=10, headers=built_home.auth) as client:
        batch = client.post("/api/v1/predict/batch", json={"observations": days}).json()
        singles = [client.post("/api/v1/predict", json=d).json() for d in days]
    assert [p["probability"] for p in batch["predictions"]] == [s["probability"] for s in singles]
    assert [p["risk_level"] for p in batch["predictions"]] == [s["risk_level"] for s in singles]


def test_concurrent_burst_has_no_errors_and_is_batched(server: Server, built_home: BuiltHome) -> None:
    before = httpx.get(f"{server.url}/metrics", timeout=10).text
    # 300 requests through one dependency connection: BentoML's default would have
    # recycled the session three times under in-flight calls.
    report = asyncio.run(
        post_many(f"{server.url}/api/v1/predict", DAY, requests=300, concurrency=16, headers=built_home.auth)
    )
    assert report.errors == 0, report.statuses
    after = httpx.get(f"{server.url}/metrics", timeout=10).text

    def delta(name: str) -> float:
        return metric_total(after, name) - metric_total(before, name)

    # Rows reach the model through the API workers' coalescers and the model service's
    # batcher; either way, 300 concurrent requests must take fewer model runs (1.9 rows a
    # run at concurrency 16 with two API workers in one CI run, 2+ in others).
    runs = delta("flood_adaptive_batch_size_count")
    rows = delta("flood_adaptive_batch_size_sum")
    assert rows >= 300 and runs > 0
    assert rows / runs > 1.0, f"{runs:.0f} model runs for {rows:.0f} rows: requests were never merged"
    assert delta("bentoml_service_adaptive_batch_size_count") > 0  # BentoML's batcher is on
    assert delta("flood_predictions_total") >= 300
    assert delta("flood_prediction_latency_seconds_count") >= 300


def test_metrics_carry_backups_and_ops_counters(server: Server, built_home: BuiltHome) -> None:
    from ops.backup import run_backup

    manifest = run_backup(kind="full", settings=built_home.settings)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.post("/api/v1/predict", json=DAY).status_code == 401
        text = client.get("/metrics").text
    # Read from the backup catalogue at scrape time, appended to BentoML's own output.
    stamp = metric_total(text, "flood_backup_last_success_timestamp_seconds")
    assert stamp == pytest.approx(manifest.created_at.timestamp())
    assert metric_total(text, "flood_backup_files") >= 1
    assert 'flood_auth_refusals_total{reason="missing"}' in text
    # A metric family is described once, or Prometheus rejects the whole scrape.
    help_lines = re.findall(r"^# HELP (\S+)", text, re.MULTILINE)
    assert len(help_lines) == len(set(help_lines))


def test_swagger_document_lists_and_describes_our_routes(server: Server) -> None:
    """BentoML's ``/docs.json`` (behind the Swagger UI at ``/``) merges the FastAPI edge's."""
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert "swagger" in client.get("/").text.lower()
        paths = client.get("/docs.json").json()["paths"]
        ours = client.get("/api/v1/openapi.json").json()["paths"]
    for path in ("/api/v1/predict", "/api/v1/predict/batch", "/api/v1/model"):
        assert path in paths, sorted(paths)
    predict = paths["/api/v1/predict"]["post"]
    assert predict["summary"] == ours["/api/v1/predict"]["post"]["summary"]
    example = predict["requestBody"]["content"]["application/json"]["examples"]["a wet day"]["value"]
    assert example == DAY
    assert {"401", "422", "429"} <= set(predict["responses"])


def _access_lines(log: str, path: str) -> list[str]:
    return [line for line in log.splitlines() if f"path={path}," in line]


def test_prediction_routes_are_untraced_and_the_model_service_unlogged_by_default(
    server: Server, built_home: BuiltHome
) -> None:
    """BentoML's per-request tracing and the model service's access log cost CPU on every
    request; by default the prediction routes skip the first and the model service the second."""
    with httpx.Client(base_url=server.url, timeout=10, headers=built_home.auth) as client:
        for _ in range(3):
            assert client.post("/api/v1/predict", json=DAY).status_code == 200
    log = server.log.read_text()
    api_lines = _access_lines(log, "/api/v1/predict")
    assert api_lines, "the API's access log is on by default"
    assert not any("trace=" in line for line in api_lines), api_lines[-1]
    assert not _access_lines(log, "/predict"), "the model service logged its calls"


def test_tracing_model_logging_and_in_process_model_are_settings(
    built_home: BuiltHome, tmp_path: Path
) -> None:
    version = max(built_home.bentos)
    env = {"SERVING_TRACING": "true", "SERVING_MODEL_ACCESS_LOG": "true", "SERVING_MODEL_IN_PROCESS": "false"}
    traced = start_server(
        built_home.bentos[version], settings=built_home.settings, log=tmp_path / "a.log", env=env
    )
    try:
        with httpx.Client(base_url=traced.url, timeout=10, headers=built_home.auth) as client:
            by_runner = [client.post("/api/v1/predict", json=DAY).json() for _ in range(3)]
        log = traced.log.read_text()
        assert all("trace=" in line for line in _access_lines(log, "/api/v1/predict"))
        assert _access_lines(log, "/predict"), "SERVING_MODEL_ACCESS_LOG=true logs the model service's calls"
    finally:
        stop_server(traced.process)
    inprocess = start_server(
        built_home.bentos[version],
        settings=built_home.settings,
        log=tmp_path / "b.log",
        env={"SERVING_MODEL_IN_PROCESS": "true", "SERVING_MODEL_ACCESS_LOG": "true"},
    )
    try:
        with httpx.Client(base_url=inprocess.url, timeout=10, headers=built_home.auth) as client:
            in_worker = [client.post("/api/v1/predict", json=DAY).json() for _ in range(3)]
        log = inprocess.log.read_text()
    finally:
        stop_server(inprocess.process)
    # The model service still starts, and is never called.
    assert _access_lines(log, "/api/v1/predict") and not _access_lines(log, "/predict")
    # The same answer either way, from the same pinned version.
    strip = [{k: v for k, v in body.items() if k != "request_id"} for body in by_runner + in_worker]
    assert all(body == strip[0] for body in strip), strip
