"""One readiness: BentoML's ``/readyz`` and our ``/health/ready`` agree, on a served Bento,
as a required dependency goes down and comes back."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REDIS_URL, require_service
from tests.ops.proxy import FaultyProxy
from tests.serving.conftest import BuiltHome, start_server, stop_server

pytestmark = [pytest.mark.serve, pytest.mark.slow, pytest.mark.redis]


def statuses(url: str) -> tuple[int, int]:
    with httpx.Client(base_url=url, timeout=10) as client:
        return client.get("/readyz").status_code, client.get("/health/ready").status_code


def wait_for(url: str, wanted: tuple[int, int], *, timeout_s: float = 20) -> tuple[int, int]:
    deadline = time.monotonic() + timeout_s
    seen = statuses(url)
    while seen != wanted and time.monotonic() < deadline:
        time.sleep(0.3)
        seen = statuses(url)
    return seen


def test_readyz_and_health_ready_agree_as_redis_fails_closed(built_home: BuiltHome, tmp_path: Path) -> None:
    require_service("Redis", "127.0.0.1", 6379)
    proxy = FaultyProxy("127.0.0.1", 6379)
    proxy.start()
    env = {"REDIS_URL": proxy.url_for(REDIS_URL, 6379), "RATE_LIMIT_POLICY": "fail-closed"}
    server = start_server(
        built_home.bentos[max(built_home.bentos)],
        settings=built_home.settings,
        log=tmp_path / "serve.log",
        env=env,
    )
    try:
        assert statuses(server.url) == (200, 200)
        proxy.stop()
        # Fail-closed limits cannot be checked without Redis: neither readiness may say ready.
        assert wait_for(server.url, (503, 503)) == (503, 503)
        body = httpx.get(f"{server.url}/health/ready", timeout=10).json()
        assert body["ready"] is False and body["checks"]["redis"]["status"] == "unhealthy"
        proxy.start()
        assert wait_for(server.url, (200, 200)) == (200, 200)
    finally:
        proxy.stop()
        stop_server(server.process)
