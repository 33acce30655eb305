"""Every API worker's state in ``/health/detailed``: published files, and a served Bento."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from serving.workerstates import STALE_AFTER_S, aggregate_states, publish_state, read_states
from tests.serving.conftest import BuiltHome, Server


def report(status: str = "ok", inserted: int = 0) -> dict[str, dict[str, Any]]:
    return {
        "rate_limiter": {"status": "ok", "redis_failures": 1, "fallback_decisions": 0},
        "prediction_log": {
            "status": status,
            "rows_inserted": inserted,
            "problems": [] if status == "ok" else ["x"],
        },
    }


def test_states_of_live_workers_are_summed_and_exited_ones_removed(tmp_path: Path) -> None:
    publish_state(tmp_path, report(inserted=5))  # this process: the answering worker
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        for pid, inserted, status in ((other.pid, 7, "degraded"), (gone.pid, 100, "ok")):
            state = {"pid": pid, "published_at": time.time(), "operations": report(status, inserted)}
            (tmp_path / f"{pid}.json").write_text(json.dumps(state))
        states = read_states(tmp_path)
        assert {s["pid"] for s in states} == {os.getpid(), other.pid}
        assert not (tmp_path / f"{gone.pid}.json").exists()
        summary = aggregate_states(report(inserted=6), states)
        # Our own fresh report replaces our published one.
        assert summary["count"] == 2 and summary["prediction_log"]["rows_inserted"] == 13
        assert summary["rate_limiter"]["redis_failures"] == 2
        assert summary["status"] == "degraded" and summary["degraded"] == [other.pid]
        late = read_states(tmp_path, now=time.time() + STALE_AFTER_S + 1)
        assert aggregate_states(report(), late)["stale"] == [other.pid]
    finally:
        other.kill()
        other.wait()


def api_workers(server: Server) -> list[psutil.Process]:
    found = []
    for process in psutil.Process(server.process.pid).children(recursive=True):
        argv = process.cmdline()
        if ("--service-name", "flood_risk") in itertools.pairwise(argv):
            found.append(process)
    return found


def detailed(server: Server) -> dict[str, Any]:
    # A stopped worker may hold a connection forever: short timeouts, new connections.
    for _ in range(20):
        try:
            return httpx.get(f"{server.url}/health/detailed", timeout=3).json()
        except httpx.HTTPError:
            continue
    raise AssertionError("no worker answered /health/detailed")


@pytest.mark.serve
@pytest.mark.slow
def test_detailed_health_covers_every_api_worker_and_names_a_stuck_one(
    server: Server, built_home: BuiltHome
) -> None:
    workers = api_workers(server)
    assert len(workers) >= 2, "the served Bento runs one API worker per core; this needs two"
    with httpx.Client(base_url=server.url, timeout=10, headers=built_home.auth) as client:
        for _ in range(20):
            assert (
                client.post(
                    "/api/v1/predict", json={"temperature": 28, "humidity": 85, "rainfall": 5}
                ).status_code
                == 200
            )
    time.sleep(3)  # every worker has published since
    body = detailed(server)
    summary = body["api_workers"]
    assert summary["count"] == len(workers), summary
    assert {w["pid"] for w in summary["workers"]} == {w.pid for w in workers}
    assert summary["status"] == "ok" and body["status"] == "healthy", summary
    stuck = workers[0]
    stuck.send_signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + STALE_AFTER_S + 10
        while time.monotonic() < deadline:
            body = detailed(server)
            if stuck.pid in body["api_workers"]["stale"]:
                break
            time.sleep(1)
        assert stuck.pid in body["api_workers"]["stale"], body["api_workers"]
        assert body["status"] == "degraded"
    finally:
        stuck.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and detailed(server)["api_workers"]["stale"]:
        time.sleep(1)
    assert detailed(server)["api_workers"]["status"] == "ok"
