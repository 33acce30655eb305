"""A backup whose Celery worker is SIGKILLed with its pool child mid-run: the attempt is
recorded as a failure once past its time limit (not STARTED forever), and the broker
redelivers the task to the next worker, which completes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from celery import Celery

from core.settings import Settings
from ops.backup import verify_backup
from ops.backup.catalogue import backup_summary
from ops.tasks import visibility_timeout
from tests.conftest import REDIS_URL, require_service
from tests.ops.backup.support import insert_rows, upgraded_postgres_database

pytestmark = [pytest.mark.faults, pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

TIME_LIMIT_S = 10
DELAY_S = 6
LATER_S = TIME_LIMIT_S + 61  # past the time limit and the sweep's grace
VISIBILITY_S = int(TIME_LIMIT_S * 1.2) + 10
ROOT = Path(__file__).resolve().parents[2]


def _broker_url() -> str:
    # A Redis database of its own: the short visibility timeout sweeps every unacknowledged
    # task in the database, and must not reach other tests' tasks.
    parts = urlsplit(REDIS_URL)
    require_service("Redis", parts.hostname or "127.0.0.1", parts.port or 6379)
    return urlunsplit(parts._replace(path="/13"))


def _start_worker(env: dict[str, str], queue: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.ops.slow_backup", "worker", "-Q", queue,
             "--pool", "prefork", "--concurrency", "1", "--hostname", f"{uuid.uuid4().hex[:8]}@%h",
             "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
            env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: one killpg reaches the main process and its child
        )  # fmt: skip


def _wait(condition: object, *, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not condition():  # type: ignore[operator]
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.2)
    return time.monotonic() - start


def test_a_backup_whose_worker_is_killed_is_failed_then_redelivered_and_completed(
    tmp_path: Path, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    assert visibility_timeout(Settings(backup_time_limit_seconds=TIME_LIMIT_S)) == VISIBILITY_S
    broker = _broker_url()
    queue = f"flood.test.{uuid.uuid4().hex[:12]}"
    backup_dir = settings.backup_dir
    running = backup_dir / "running"
    producer = Celery(broker=broker, backend=broker, set_as_current=False)
    workers: list[subprocess.Popen[bytes]] = []
    with upgraded_postgres_database() as url:
        insert_rows(url, keys=3, predictions=50)
        env = {
            **os.environ,
            "FLOOD_HOME": str(settings.flood_home),
            "DATABASE_URL": url,
            "CELERY_BROKER_URL": broker,
            "CELERY_RESULT_BACKEND": broker,
            "BACKUP_TIME_LIMIT_SECONDS": str(TIME_LIMIT_S),
            "FLOOD_TEST_BACKUP_DELAY_S": str(DELAY_S),
        }
        try:
            workers.append(_start_worker(env, queue, tmp_path / "worker-1.log"))
            result = producer.send_task("flood.backup.run", kwargs={"kind": "full"}, queue=queue)
            _wait(lambda: list(running.glob("*.json")), timeout_s=60, what="the backup started")
            os.killpg(workers[0].pid, signal.SIGKILL)  # main process and pool child at once
            workers[0].wait(timeout=10)
            killed = time.monotonic()

            def state() -> str:
                # Fresh from the backend: an AsyncResult caches a ready state (FAILURE) for good.
                return str(producer.backend.get_task_meta(result.id, cache=False)["status"])

            assert state() == "STARTED"

            # What beat's sweep (every 10 min) or a restarted worker finds once the time limit is past.
            swept = subprocess.run(
                [sys.executable, "-c",
                 "from datetime import UTC, datetime, timedelta; from ops.tasks import sweep_stuck_backups; "
                 f"print(sweep_stuck_backups(now=datetime.now(UTC) + timedelta(seconds={LATER_S})))"],
                env=env, cwd=ROOT, capture_output=True, text=True, check=True,
            )  # fmt: skip
            assert result.id in swept.stdout, swept.stdout + swept.stderr
            assert state() == "FAILURE"
            assert backup_summary(backup_dir=backup_dir).failures_total == 1

            workers.append(_start_worker(env, queue, tmp_path / "worker-2.log"))
            redelivered = _wait(
                lambda: state() == "SUCCESS",
                timeout_s=VISIBILITY_S + 60,
                what="the killed backup redelivered and completed",
            )
            summary = producer.backend.get_task_meta(result.id, cache=False)["result"]
            with capsys.disabled():
                print(
                    f"\n[celery] backup killed mid-run: counted failed, then redelivered and completed "
                    f"{time.monotonic() - killed:.1f} s after the kill ({redelivered:.1f} s after the new "
                    f"worker started; visibility timeout {VISIBILITY_S} s)"
                )
            manifest = verify_backup(
                backup_dir / summary["file"],
                settings=Settings(flood_home=settings.flood_home, database_url=url),
            ).manifest
            assert manifest.sha256 == summary["sha256"]
            assert not list(running.glob("*.json"))
        finally:
            for worker in workers:
                if worker.poll() is None:
                    os.killpg(worker.pid, signal.SIGTERM)
                    try:
                        worker.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        os.killpg(worker.pid, signal.SIGKILL)
            producer.close()
            client = redis.Redis.from_url(broker)
            client.flushdb()
            client.close()
