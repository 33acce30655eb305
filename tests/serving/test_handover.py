"""``flood serve --replace``: a rollback on one machine under load, with no request lost.

Two Bentos (v1, v2) are served in turn on one port by the real CLI, as an operator would:
``flood serve TAG``, then ``flood serve --replace OTHER`` while clients keep sending.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from serving.handover import migration_enabled, serving_pid
from tests.conftest import IN_CI
from tests.serving.conftest import BuiltHome, free_port, serve_env, wait_ready

pytestmark = [pytest.mark.serve, pytest.mark.slow]

DAY = {"temperature": 28, "humidity": 85, "rainfall": 80, "month": 8}
PROJECT_DIR = Path(__file__).resolve().parents[2]


def flood_serve(built_home: BuiltHome, *args: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", *args],
            cwd=PROJECT_DIR,
            env=serve_env(built_home.settings),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)


async def load_until(
    url: str, headers: dict[str, str], *, keepalive: bool, done: asyncio.Event, concurrency: int = 8
) -> tuple[Counter[int | str], Counter[str]]:
    """POSTs at ``concurrency`` until ``done`` is set: statuses and the versions that answered."""
    statuses: Counter[int | str] = Counter()
    versions: Counter[str] = Counter()
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency if keepalive else 0
    )

    async def worker(client: httpx.AsyncClient) -> None:
        while not done.is_set():
            try:
                response = await client.post(f"{url}/api/v1/predict", json=DAY)
                statuses[response.status_code] += 1
                versions[response.headers.get("X-Model-Version", "?")] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1

    async with httpx.AsyncClient(limits=limits, timeout=30, headers=headers) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return statuses, versions


@pytest.mark.parametrize("keepalive", [False, True], ids=["new-connections", "keep-alive"])
def test_rollback_under_load_refuses_nothing(
    built_home: BuiltHome, tmp_path: Path, keepalive: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    if not migration_enabled():
        message = "net.ipv4.tcp_migrate_req is 0 (.ci/run sets it to 1)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    newer, older = max(built_home.bentos), min(built_home.bentos)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = flood_serve(built_home, built_home.bentos[newer].tag, "--port", str(port), log=first_log)
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_ready(url, first, first_log)
        # One server per port unless asked: a second plain `flood serve` is refused, clearly.
        refused = subprocess.run(
            [sys.executable, "-m", "cli.main", "serve", "--port", str(port), built_home.bentos[older].tag],
            cwd=PROJECT_DIR,
            env=serve_env(built_home.settings),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert refused.returncode == 1 and "--replace" in refused.stderr

        async def roll_back() -> tuple[Counter[int | str], Counter[str], float]:
            nonlocal second
            done = asyncio.Event()
            load = asyncio.create_task(load_until(url, built_home.auth, keepalive=keepalive, done=done))
            await asyncio.sleep(2)
            started = time.monotonic()
            second = flood_serve(
                built_home, "--replace", built_home.bentos[older].tag, "--port", str(port), log=second_log
            )
            while first.poll() is None and time.monotonic() - started < 150:
                await asyncio.sleep(0.2)
            took = time.monotonic() - started
            await asyncio.sleep(2)  # and a little more on the new server alone
            done.set()
            statuses, versions = await load
            return statuses, versions, took

        statuses, versions, took = asyncio.run(roll_back())
        with capsys.disabled():
            print(f"\n[handover] {'keep-alive' if keepalive else 'new connections'}: {dict(statuses)}, "
                  f"versions {dict(versions)}, old server gone after {took:.1f} s")  # fmt: skip
        assert first.poll() == 0, first_log.read_text()[-2000:]  # the old server drained and exited cleanly
        assert set(statuses) == {200}, statuses
        assert versions[str(newer)] > 0 and versions[str(older)] > 0
        assert httpx.get(f"{url}/api/v1/model", headers=built_home.auth).json()["version"] == older
        run_dir = built_home.settings.flood_home.resolve() / "run"
        assert second is not None and serving_pid(run_dir / f"serve-127.0.0.1-{port}.pid") == second.pid
    finally:
        for process in (first, second):
            if process is not None:
                stop_group(process.pid)
