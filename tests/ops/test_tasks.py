"""The Celery app: configuration, beat times in Asia/Manila, a real worker running a backup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import pytest
import redis
from celery import Celery

from core.settings import Settings, get_settings
from ops.backup import verify_backup
from ops.tasks import (
    BACKUP_QUEUE,
    HEARTBEAT_SUFFIX,
    MAINTENANCE_QUEUE,
    app,
    beat_schedule,
    celery_config,
    next_run_at,
)
from tests.conftest import REDIS_URL, require_service
from tests.ops.backup.support import insert_rows, table_counts, upgraded_postgres_database

MANILA = ZoneInfo("Asia/Manila")


def test_config_is_json_only_acks_late_prefetch_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/2")
    get_settings.cache_clear()
    config = celery_config(get_settings())
    assert config["broker_url"] == config["result_backend"] == "redis://cache:6379/2"
    assert config["accept_content"] == config["result_accept_content"] == ["json"]
    assert config["task_serializer"] == config["result_serializer"] == "json"
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1
    assert config["timezone"] == "Asia/Manila"
    assert config["task_routes"]["flood.backup.*"]["queue"] == BACKUP_QUEUE

    monkeypatch.setenv("CELERY_BROKER_URL", "redis://broker:6379/5")
    get_settings.cache_clear()
    assert celery_config(get_settings())["broker_url"] == "redis://broker:6379/5"

    # With nothing set: a local Redis, but not db 0, where the rate limiter and tests live.
    monkeypatch.delenv("CELERY_BROKER_URL")
    monkeypatch.delenv("REDIS_URL")
    get_settings.cache_clear()
    assert celery_config(get_settings())["broker_url"] == "redis://127.0.0.1:6379/1"


def test_schedule_is_described_in_philippine_time() -> None:
    from ops.tasks import describe_schedule

    now = datetime(2026, 12, 2, 16, 0, tzinfo=UTC)  # Thursday 00:00 in Manila
    lines = describe_schedule(now=now)
    assert len(lines) == len(beat_schedule())
    daily = next(line for line in lines if line.startswith("backup-full-daily"))
    assert "flood.backup.run" in daily
    assert daily.endswith("next Thu 2026-12-03 02:00 PHT (Asia/Manila, UTC+8)")
    assert not any(" PST" in line for line in lines)


def test_every_beat_entry_names_a_registered_task() -> None:
    for entry in beat_schedule().values():
        assert entry["task"] in app.tasks


@pytest.mark.parametrize(
    ("entry", "after", "expected"),
    [
        # 01:30 in Manila is 17:30 UTC the day before: the 02:00 run is half an hour away.
        ("backup-full-daily", datetime(2026, 11, 28, 17, 30, tzinfo=UTC), datetime(2026, 11, 29, 2, 0)),
        ("backup-full-daily", datetime(2026, 11, 29, 2, 0, tzinfo=MANILA), datetime(2026, 11, 30, 2, 0)),
        ("backup-full-daily", datetime(2026, 12, 31, 23, 0, tzinfo=MANILA), datetime(2027, 1, 1, 2, 0)),
        # 2026-11-28 is a Saturday; 2026-11-29 a Sunday.
        ("backup-schema-weekly", datetime(2026, 11, 28, 12, 0, tzinfo=MANILA), datetime(2026, 11, 29, 3, 0)),
        ("backup-schema-weekly", datetime(2026, 11, 29, 3, 0, tzinfo=MANILA), datetime(2026, 12, 6, 3, 0)),
        # Sunday 19:30 UTC is already Monday 03:30 in Manila: next Sunday, not today.
        ("backup-schema-weekly", datetime(2026, 11, 29, 19, 30, tzinfo=UTC), datetime(2026, 12, 6, 3, 0)),
        ("backup-cleanup-daily", datetime(2026, 11, 29, 4, 0, tzinfo=MANILA), datetime(2026, 11, 29, 4, 30)),
        (
            "prediction-log-retention-daily",
            datetime(2026, 11, 29, 6, 0, tzinfo=MANILA),
            datetime(2026, 11, 30, 5, 0),
        ),
    ],
)
def test_beat_runs_at_manila_wall_clock_times(entry: str, after: datetime, expected: datetime) -> None:
    next_run = next_run_at(entry, after=after)
    assert next_run.astimezone(MANILA).replace(tzinfo=None) == expected
    assert next_run > after


@pytest.fixture
def worker_env(tmp_path: Path, settings: Settings) -> Iterator[dict[str, str]]:
    parts = urlsplit(REDIS_URL)
    require_service("Redis", parts.hostname or "127.0.0.1", parts.port or 6379)
    with upgraded_postgres_database() as url:
        insert_rows(url, keys=5, predictions=120)
        yield {
            **os.environ,
            "FLOOD_HOME": str(settings.flood_home),
            "DATABASE_URL": url,
            "CELERY_BROKER_URL": REDIS_URL,
        }


@pytest.fixture
def worker(worker_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """A real ``celery worker`` consuming a queue no other test or worker uses."""
    queue = f"flood.test.{uuid.uuid4().hex[:12]}"
    log = (tmp_path / "worker.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "ops.tasks",
            "worker",
            "-Q",
            queue,
            "--pool",
            "solo",
            "--hostname",
            f"{queue}@%h",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "INFO",
        ],
        env=worker_env,
        cwd=Path(__file__).resolve().parents[2],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield queue
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        client = redis.Redis.from_url(REDIS_URL)
        leftovers = list(client.scan_iter(match=f"*{queue}*"))  # the queue and kombu's bindings
        if leftovers:
            client.delete(*leftovers)
        client.close()


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.slow
def test_worker_runs_the_backup_task_against_postgres(
    worker: str, worker_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A separate producer app: what beat does is send a task by name to a queue.
    producer = Celery(broker=REDIS_URL, backend=REDIS_URL, set_as_current=False)
    result = producer.send_task("flood.backup.run", kwargs={"kind": "full"}, queue=worker)
    try:
        summary = result.get(timeout=120)
    except Exception as exc:
        pytest.fail(f"task failed: {exc!r}\nworker log:\n{(tmp_path / 'worker.log').read_text()}")
    finally:
        result.forget()
        producer.close()

    assert summary["kind"] == "full"
    assert summary["tables"] == table_counts(worker_env["DATABASE_URL"])
    backup = Path(worker_env["FLOOD_HOME"]) / "backups" / summary["file"]
    monkeypatch.setenv("DATABASE_URL", worker_env["DATABASE_URL"])
    get_settings.cache_clear()
    assert verify_backup(backup).manifest.sha256 == summary["sha256"]


def test_retention_task_goes_to_the_maintenance_queue() -> None:
    route = app.amqp.router.route({}, "flood.prediction_log.retention")
    assert route["queue"].name == MAINTENANCE_QUEUE
    assert app.amqp.router.route({}, "flood.backup.cleanup")["queue"].name == BACKUP_QUEUE


@pytest.mark.redis
def test_beat_touches_its_heartbeat_for_the_healthcheck(tmp_path: Path, settings: Settings) -> None:
    parts = urlsplit(REDIS_URL)
    require_service("Redis", parts.hostname or "127.0.0.1", parts.port or 6379)
    schedule = tmp_path / "beat" / "celerybeat-schedule"
    schedule.parent.mkdir()
    heartbeat = Path(f"{schedule}{HEARTBEAT_SUFFIX}")
    env = {**os.environ, "FLOOD_HOME": str(settings.flood_home), "CELERY_BROKER_URL": REDIS_URL}
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "ops.tasks", "beat", "--schedule", str(schedule)],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not heartbeat.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert heartbeat.exists(), f"no heartbeat (beat exit code {process.poll()})"
        assert time.time() - heartbeat.stat().st_mtime < 60
    finally:
        process.terminate()
        process.wait(timeout=20)
