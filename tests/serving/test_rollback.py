"""Rollback is serving an older Bento: it must report and answer with the older version."""

from __future__ import annotations

import asyncio
import math
import re
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import numpy as np
import pytest
from sqlalchemy import create_engine, func, select

from ops.tables import PredictionLogRow
from serving.model_store import read_model
from serving.predictor import Predictor
from tests.serving.conftest import BuiltHome, Server, serving, stop_server
from tests.serving.load import post_many

pytestmark = [pytest.mark.serve, pytest.mark.slow]

DAY = {"temperature": 28, "humidity": 85, "rainfall": 120, "month": 8}


@pytest.fixture(scope="module")
def old_server(built_home: BuiltHome, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(built_home, min(built_home.bentos), tmp_path_factory.mktemp("serve-old")) as started:
        yield started


def test_older_bento_serves_the_older_version(old_server: Server, built_home: BuiltHome) -> None:
    oldest, newest = min(built_home.bentos), max(built_home.bentos)
    assert oldest < newest
    # The newer Bento is the store's newest; the old one must still pin its own model.
    assert old_server.bento.tag != built_home.bentos[newest].tag
    served, model_dir = read_model(
        built_home.model_tags[oldest], store_dir=built_home.settings.bentoml_home / "models"
    )
    expected = Predictor.from_model_dir(model_dir, expected_sha256=served.pipeline_sha256)
    raw = np.array([[28, 85, 120, math.nan, math.nan, math.nan, 8]], dtype=float)

    with httpx.Client(base_url=old_server.url, timeout=10, headers=built_home.auth) as client:
        model = client.get("/api/v1/model").json()
        answer = client.post("/api/v1/predict", json=DAY)
    assert model["version"] == oldest
    assert model["bento_model_tag"] == built_home.model_tags[oldest]
    assert model["thresholds"]["alert"] == served.thresholds.alert
    assert answer.headers["X-Model-Version"] == str(oldest)
    assert answer.json()["model"]["version"] == oldest
    assert answer.json()["probability"] == pytest.approx(float(expected.predict_proba(raw)[0]))


def logged_predictions(built_home: BuiltHome, *, since: datetime) -> int:
    """Prediction-log rows of predictions made since ``since`` (the row's own time)."""
    engine = create_engine(built_home.settings.effective_database_url)
    query = select(func.count()).where(PredictionLogRow.created_at >= since)
    try:
        with engine.connect() as connection:
            return int(connection.execute(query).scalar_one())
    finally:
        engine.dispose()


def served_ok(log: str) -> int:
    return len(re.findall(r"path=/api/v1/predict,.*status=200", log))


def test_sigterm_lets_in_flight_requests_finish(old_server: Server, built_home: BuiltHome) -> None:
    """SIGTERM mid-burst: every request the server took up is answered, none cut off.

    The arbiter signals both services at once; the model worker keeps serving until the
    API worker has drained (serving.shutdown), so no drained request finds it gone.
    """
    before = served_ok(old_server.log.read_text())
    burst_start = datetime.now(UTC)

    def terminate_soon() -> None:
        time.sleep(1.0)
        old_server.process.send_signal(signal.SIGTERM)  # as a supervisor would: the arbiter

    killer = threading.Thread(target=terminate_soon)
    killer.start()
    # A new connection per request. Once the listener closes, new connections are refused
    # (ConnectError) or reset from the accept backlog before any request is read
    # (ReadError); neither is an in-flight request.
    report = asyncio.run(
        post_many(
            f"{old_server.url}/api/v1/predict",
            DAY,
            requests=3000,
            concurrency=8,
            keepalive=False,
            headers=built_home.auth,
        )
    )
    killer.join()
    assert stop_server(old_server.process) == 0
    assert report.statuses[200] > 0
    unexpected = {s: n for s, n in report.statuses.items() if s not in (200, "ConnectError", "ReadError")}
    assert not unexpected, report.statuses
    log = old_server.log.read_text()
    # Every request the server started, it finished and the client received.
    assert served_ok(log) - before == report.statuses[200]
    assert "status=5" not in log
    # Graceful shutdown flushed the prediction log: one row per answered prediction.
    assert logged_predictions(built_home, since=burst_start) == report.statuses[200]
