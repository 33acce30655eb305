"""The API workers check the model's signature themselves (security finding 2).

Thresholds, labels and the version the API workers answer with come from the stored
model's ``model.yaml``. Only the model worker used to check the signature, so a
``threshold_alert`` edited under a running server reached every API worker restarted
afterwards: they answered Safe where they had said Alert, and ``/health/ready`` was 200.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from ops.database import dispose_engines
from ops.migrations import upgrade_database
from tests.serving.conftest import TEST_TIERS, BuiltHome, issue_key, start_server, stop_server
from tests.serving.test_ops_http import SIGNING_KEY, copy_home, newest_bento, newest_model_dir, sign_newest
from tests.serving.test_orphans import API_SERVICE_NAME, service_of

pytestmark = [pytest.mark.security, pytest.mark.serve, pytest.mark.slow]

DAY = {"temperature": 28, "humidity": 85, "rainfall": 50}
RESTART_WITHIN_S = 90.0


def api_workers(root_pid: int) -> list[psutil.Process]:
    return [
        process
        for process in psutil.Process(root_pid).children(recursive=True)
        if service_of(process) == API_SERVICE_NAME
    ]


def test_a_restarted_api_worker_refuses_a_tampered_threshold(
    built_home: BuiltHome, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = copy_home(built_home, tmp_path)
    sign_newest(built_home, home)
    keyed = home.model_copy(update={"rate_limit_tiers": TEST_TIERS})
    upgrade_database(keyed.effective_database_url)
    headers = {"X-API-Key": issue_key(keyed, tier="load")}
    dispose_engines()
    env = {"REQUIRE_MODEL_SIGNATURE": "true", "MODEL_SIGNING_KEY": SIGNING_KEY}
    server = start_server(newest_bento(built_home, home), settings=home, log=tmp_path / "serve.log", env=env)
    try:
        before = httpx.post(f"{server.url}/api/v1/predict", json=DAY, headers=headers, timeout=10)
        assert before.status_code == 200, before.text

        model_yaml = newest_model_dir(built_home, home) / "model.yaml"
        document = yaml.safe_load(model_yaml.read_text())
        document["labels"]["threshold_alert"] = "0.99"
        model_yaml.write_text(yaml.safe_dump(document))
        killed = api_workers(server.process.pid)
        assert killed, "no API workers found"
        for worker in killed:
            os.kill(worker.pid, signal.SIGKILL)

        deadline = time.monotonic() + RESTART_WITHIN_S
        restarted: list[psutil.Process] = []
        while time.monotonic() < deadline:
            restarted = [w for w in api_workers(server.process.pid) if w.pid not in {k.pid for k in killed}]
            if len(restarted) >= len(killed):
                break
            time.sleep(0.5)
        assert len(restarted) >= len(killed), f"API workers not restarted in {RESTART_WITHIN_S} s"

        # Every restarted worker refuses: many requests, spread over both workers' accepts.
        statuses: dict[int, int] = {}
        reasons: set[str] = set()
        ready_codes: set[int] = set()
        settle = time.monotonic() + 30
        while time.monotonic() < settle:
            try:
                answer = httpx.post(f"{server.url}/api/v1/predict", json=DAY, headers=headers, timeout=10)
                ready_codes.add(httpx.get(f"{server.url}/health/ready", timeout=10).status_code)
            except httpx.TransportError:
                time.sleep(0.2)  # a worker still binding its loop
                continue
            statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
            if answer.status_code == 503:
                reasons.add(answer.json()["error"]["message"])
            if sum(statuses.values()) >= 40:
                break
        with capsys.disabled():
            print(
                f"\n[integrity] after tampering model.yaml: statuses {statuses}, /health/ready {ready_codes}"
            )
        assert statuses.get(503, 0) >= 40 and set(statuses) == {503}, statuses
        assert any("integrity check" in reason for reason in reasons), reasons
        assert ready_codes == {503}
    finally:
        stop_server(server.process)
