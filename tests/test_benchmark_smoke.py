"""A seconds-long run of ``make bench``: the harness must keep producing a complete report.

Nothing about speed is asserted; the numbers of a smoke run on a busy CI machine mean
nothing. What is asserted is the shape: every peer present and measured on both routes,
errors counted per run, ratios and goals computed, the full stack really on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI, POSTGRES_URL, REDIS_URL, require_service

PROJECT_DIR = Path(__file__).resolve().parents[1]
PEERS = {"bento", "bento-async", "bento-inprocess", "bento-nobatch", "mlflow", "ceiling"}

pytestmark = [pytest.mark.slow, pytest.mark.serve, pytest.mark.postgres, pytest.mark.redis]


def test_smoke_run_reports_every_peer(tmp_path: Path) -> None:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    require_service("Redis", "127.0.0.1", 6379)
    if shutil.which("wrk") is None:
        if IN_CI:
            pytest.fail("wrk is not installed (.ci/run must apt-get install wrk)")
        pytest.skip("wrk is not installed")
    out = tmp_path / "bench"
    redis_db = REDIS_URL.rsplit("/", 1)[0] + "/14"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out),
         "--postgres-url", POSTGRES_URL, "--redis-url", redis_db],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=540, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())

    failed = {name: peer.get("reason") for name, peer in result["peers"].items() if peer["status"] != "ok"}
    assert set(result["peers"]) == PEERS
    assert not failed, failed

    concurrencies = set(result["meta"]["config"]["concurrencies"])
    measured = {(r["peer"], r["route"], r["concurrency"]) for r in result["runs"]}
    expected = {(p, route, c) for p in PEERS for route in ("single", "batch") for c in concurrencies}
    assert measured == expected
    for run in result["runs"]:
        assert set(run["errors"]) == {"connect", "read", "write", "status", "timeout"}
        assert run["error_count"] == sum(run["errors"].values())
        assert run["requests"] > 0 and run["duration_s"] > 0
        assert {"p50", "p99"} <= set(run["latency_ms"])
        assert len(run["loadavg"]) == 3

        assert run["wrk_headroom"] > 0 and run["cpu_us_per_request"], run
        if run["peer"].startswith("bento"):
            assert {"flood_risk", "flood_risk_model"} <= set(run["cpu_us_per_request"]), run
    # The CPU breakdown from py-spy, on the last run of each route, with and without the runner.
    profiled = {(r["peer"], r["route"]) for r in result["runs"] if r.get("profile")}
    assert profiled == {(p, route) for p in ("bento", "bento-inprocess") for route in ("single", "batch")}
    for run in result["runs"]:
        if run.get("profile"):
            assert run["profile"]["samples"] > 0 and run["profile"]["us_per_request"], run["profile"]
    # Only the in-process peer runs the model in its API workers.
    parts = {r["peer"]: set(r["profile"]["us_per_request"]) for r in result["runs"] if r.get("profile")}
    assert "model, in process" not in parts["bento"] and "rate limiter" in parts["bento"], parts
    # Every API worker is sampled: with few connections one of them may get them all.
    stacks = sorted((out / "logs").glob("profile-real-bento-single-*.txt"))
    profiles = {(r["peer"], r["route"]): r["profile"] for r in result["runs"] if r.get("profile")}
    assert len(stacks) == profiles["bento", "single"]["api_workers"] >= 1, stacks
    assert sum(path.stat().st_size for path in stacks) > 0

    bento = result["peers"]["bento"]["checks"]["real"]
    assert bento["auth_enforced"], "the Bento answered without an API key: the full stack is not on"
    assert bento["prediction_log_rows"] > 0

    ours = [r for r in result["ratios"] if r["peer"] == "bento"]
    assert ours and all(r["vs_mlflow"] is not None and r["vs_ceiling"] is not None for r in ours)
    assert set(result["goals"]["real"]["met"]) >= {
        "single_vs_mlflow",
        "single_p99_ms",
        "batch_rows_per_s_best",
        "log_us_per_row",
    }
    model = result["models"]["real"]
    assert model["facts"]["features"] > 0 and model["facts"]["family"]
    assert set(result["inprocess"]["real"]) == {"1", "64", "512"}
    assert result["meta"]["packages"]["bentoml"] and result["meta"]["machine"]["cores"]
    assert (out / "bench.md").read_text().count("| real |") >= 8
    assert (out / "bench.png").stat().st_size > 0
