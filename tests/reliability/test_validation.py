"""Hostile and malformed input against the HTTP edge, in-process with the real model and
the real ops (API keys, in-process rate limits, the prediction log in SQLite).

Every answer must be the documented 4xx, never a 5xx, and whatever is stored or echoed
must be exactly what was meant, not what an attacker wrote.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, inspect, select
from starlette.testclient import TestClient

from core.observation import FIELD_NAMES, INPUT_FIELDS, REQUIRED_FIELDS
from core.settings import get_settings
from ops.database import dispose_engines
from ops.migrations import upgrade_database
from ops.tables import PredictionLogRow
from serving.api.app import create_app
from serving.api.deps import body_limit_bytes
from serving.operations import EdgeOperations
from serving.predictor import Predictor, ServedModel, engine_for
from tests.serving.api.test_app import LocalBackend, serve_backend
from tests.serving.conftest import TEST_TIERS, issue_key

pytestmark = [pytest.mark.faults]

DAY = {"temperature": 28, "humidity": 85, "rainfall": 50}
RANGES = {f.name: (f.minimum, f.maximum) for f in INPUT_FIELDS}
HYPOTHESIS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
INJECTIONS = [
    "'; DROP TABLE prediction_log; --",
    '" OR 1=1 --',
    "1); DELETE FROM api_keys; --",
    "x\r\nX-Injected: 1",
    "line\nERROR forged log line",
    "${jndi:ldap://example.invalid/a}",
    "<script>alert(1)</script>",
    "\u0000\u202e",
]


class Edge:
    """The app with real ops on SQLite, and a key of the load tier."""

    def __init__(self, client: TestClient, key: str, database_url: str, operations: EdgeOperations) -> None:
        self.client = client
        self.key = key
        self.database_url = database_url
        self.operations = operations

    def post(self, path: str, content: bytes | str, **headers: str) -> Any:
        return self.client.post(
            path,
            content=content,
            headers={"X-API-Key": self.key, "Content-Type": "application/json", **headers},
        )

    def predict(self, body: Any, **headers: str) -> Any:
        return self.post("/api/v1/predict", json.dumps(body), **headers)

    def batch(self, observations: Any, **headers: str) -> Any:
        return self.post("/api/v1/predict/batch", json.dumps({"observations": observations}), **headers)


@pytest.fixture
def edge(
    flood_home: Path,
    served_model: tuple[ServedModel, Path],
    predictor: Predictor,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Edge]:
    monkeypatch.setenv("RATE_LIMIT_TIERS", json.dumps(TEST_TIERS))
    get_settings.cache_clear()
    settings_ = get_settings()
    upgrade_database(settings_.effective_database_url)
    key = issue_key(settings_, tier="load")
    served, model_dir = served_model
    operations = EdgeOperations.start(settings_)
    backend = LocalBackend(
        served=served, predictor=predictor, engine=engine_for(model_dir), operations=operations
    )
    app = serve_backend(create_app(), backend)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Edge(client, key, settings_.effective_database_url, operations)
    operations.close()
    dispose_engines()


def in_range(name: str) -> st.SearchStrategy[float]:
    low, high = RANGES[name]
    if name == "month":
        return st.integers(int(low), int(high))
    return st.floats(low, high, allow_nan=False, allow_infinity=False)


@st.composite
def valid_observations(draw: st.DrawFn) -> dict[str, Any]:
    body = {name: draw(in_range(name)) for name in REQUIRED_FIELDS}
    for name in ("wind_speed", "month"):
        if draw(st.booleans()):
            body[name] = draw(in_range(name))
    # Multi-day sums include the day: 3-day >= day, 7-day >= 3-day.
    if draw(st.booleans()):
        body["rainfall_3d"] = body["rainfall"] + draw(st.floats(0, 2000))
        if draw(st.booleans()):
            body["rainfall_7d"] = body["rainfall_3d"] + draw(st.floats(0, 3000))
    return body


@st.composite
def out_of_range(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    name = draw(st.sampled_from(["temperature", "humidity", "rainfall", "wind_speed", "month"]))
    low, high = RANGES[name]
    value: float
    if name == "month":
        value = draw(st.integers(max_value=int(low) - 1) | st.integers(min_value=int(high) + 1))
    else:
        below = st.floats(max_value=low, exclude_max=True, allow_nan=False, allow_infinity=False)
        above = st.floats(min_value=high, exclude_min=True, allow_nan=False, allow_infinity=False)
        value = draw(below | above)
    return {**DAY, name: value}, name


@HYPOTHESIS
@given(body=valid_observations())
def test_any_valid_observation_is_predicted(edge: Edge, body: dict[str, Any]) -> None:
    answer = edge.predict(body)
    assert answer.status_code == 200, answer.text
    assert 0.0 <= answer.json()["probability"] <= 1.0


@HYPOTHESIS
@given(case=out_of_range())
def test_out_of_range_values_are_422_naming_the_field(edge: Edge, case: tuple[dict[str, Any], str]) -> None:
    body, name = case
    answer = edge.predict(body)
    assert answer.status_code == 422, answer.text
    assert name in {d["field"] for d in answer.json()["error"]["detail"]}


WRONG_TYPES = st.one_of(
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.text(max_size=20).filter(lambda s: not _is_number(s)),
)


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


@HYPOTHESIS
@given(name=st.sampled_from(list(FIELD_NAMES)), value=WRONG_TYPES)
def test_wrong_types_are_422(edge: Edge, name: str, value: Any) -> None:
    if value is None and name not in REQUIRED_FIELDS:
        return  # null is how an optional field says "not measured"
    answer = edge.predict({**DAY, name: value})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["detail"][0]["field"] in (name, f"{name}.[key]", "(body)")


@HYPOTHESIS
@given(value=st.floats(0, 100, allow_nan=False))
def test_numeric_strings_mean_the_number(edge: Edge, value: float) -> None:
    """Lax parsing, on purpose: "85.5" is the reading 85.5, and it is logged as a number."""
    as_string = edge.predict({**DAY, "humidity": repr(value)})
    as_number = edge.predict({**DAY, "humidity": value})
    assert as_string.status_code == as_number.status_code == 200
    assert as_string.json()["probability"] == as_number.json()["probability"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e309", "-1e309", "9" * 5000])
def test_non_finite_and_huge_numbers_are_refused(edge: Edge, literal: str) -> None:
    single = edge.post("/api/v1/predict", f'{{"temperature": {literal}, "humidity": 85, "rainfall": 50}}')
    assert single.status_code in (400, 422), single.text
    batch = edge.post(
        "/api/v1/predict/batch",
        f'{{"observations": [{{"temperature": {literal}, "humidity": 85, "rainfall": 50}}]}}',
    )
    assert batch.status_code in (400, 422), batch.text


@HYPOTHESIS
@given(
    missing=st.sets(st.sampled_from(list(REQUIRED_FIELDS)), min_size=1),
    unknown=st.dictionaries(
        st.text(min_size=1, max_size=12).filter(lambda k: k not in FIELD_NAMES), st.integers(), max_size=3
    ),
)
def test_missing_and_unknown_fields_are_named(edge: Edge, missing: set[str], unknown: dict[str, int]) -> None:
    body = {k: v for k, v in DAY.items() if k not in missing} | unknown
    answer = edge.predict(body)
    assert answer.status_code == 422, answer.text
    fields = {d["field"] for d in answer.json()["error"]["detail"]}
    assert missing | set(unknown) <= fields


@HYPOTHESIS
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_arbitrary_bytes_never_cause_a_server_error(edge: Edge, raw: bytes) -> None:
    for path in ("/api/v1/predict", "/api/v1/predict/batch"):
        answer = edge.post(path, raw)
        assert answer.status_code in (200, 400, 413, 422), (path, raw, answer.text)


def test_oversized_bodies_are_413_declared_or_streamed(edge: Edge) -> None:
    limit = body_limit_bytes()
    padded = json.dumps(DAY) + " " * limit
    for path in ("/api/v1/predict", "/api/v1/predict/batch"):
        declared = edge.post(path, padded)
        assert declared.status_code == 413, declared.text

        def chunks() -> Iterator[bytes]:
            for _ in range(limit // 4096 + 2):
                yield b" " * 4096

        streamed = edge.client.post(
            path, content=chunks(), headers={"X-API-Key": edge.key, "Content-Type": "application/json"}
        )
        assert streamed.status_code == 413, streamed.text
    # A full batch fits with room to spare.
    full = [DAY] * get_settings().predict_batch_max
    assert edge.batch(full).status_code == 200


@pytest.mark.parametrize("depth", [1_000, 10_000, 100_000])
def test_deeply_nested_json_is_400(edge: Edge, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    assert edge.post("/api/v1/predict", nested).status_code == 400
    answer = edge.post("/api/v1/predict/batch", f'{{"observations": {nested}}}')
    assert answer.status_code in (400, 413), answer.text


def test_a_batch_over_the_limit_is_413(edge: Edge) -> None:
    limit = get_settings().predict_batch_max
    answer = edge.batch([DAY] * (limit + 1))
    assert answer.status_code == 413 and f"at most {limit}" in answer.json()["error"]["message"]


@pytest.mark.parametrize("attack", INJECTIONS)
def test_injection_strings_are_refused_or_stored_as_data(edge: Edge, attack: str) -> None:
    # As a request id: not the pattern, so replaced by a generated one, which is what is logged.
    header_safe = attack.encode("latin-1", "replace").decode("latin-1").replace("\r", " ").replace("\n", " ")
    answered = edge.predict(DAY, **{"X-Request-ID": header_safe})
    assert answered.status_code == 200, answered.text
    request_id = answered.json()["request_id"]
    assert request_id != header_safe and len(request_id) == 32
    # As a value or a field name: refused, and echoed only as JSON data.
    for body in ({**DAY, "humidity": attack}, {**DAY, attack: 1}):
        refused = edge.predict(body)
        assert refused.status_code == 422
        assert refused.headers["content-type"] == "application/json"
        json.loads(refused.text)  # one JSON document, whatever the attack contained
    assert edge.operations.log.flush()
    engine = create_engine(edge.database_url)
    try:
        assert {"prediction_log", "api_keys"} <= set(inspect(engine).get_table_names())
        with engine.connect() as connection:
            rows = connection.execute(
                select(PredictionLogRow.request_id, PredictionLogRow.inputs).where(
                    PredictionLogRow.request_id == request_id
                )
            ).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in rows] == [(request_id, {k: float(v) for k, v in DAY.items()})]
