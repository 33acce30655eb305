"""The Celery app: scheduled backups, backup retention and prediction-log retention.

Run by ``celery -A ops.tasks worker -Q flood.backups,flood.maintenance`` and
``celery -A ops.tasks beat``. Tasks are thin: they call the plain functions in
:mod:`ops.backup` and :mod:`ops.retention`, retry what a later attempt can fix and return a
JSON summary. Configuration is read from settings when Celery first needs it, not at import.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# Celery ships no type information: its base classes and decorators are Any to mypy, hence
# the targeted ignores on them below.
from celery import Celery, Task
from celery.beat import PersistentScheduler
from celery.schedules import crontab
from celery.signals import beat_init, worker_process_init, worker_ready

from core.errors import BackupError
from core.settings import Settings, get_settings
from ops import backup, retention
from ops.backup.catalogue import record_failure
from ops.database import dispose_engines

logger = logging.getLogger(__name__)

TIMEZONE = "Asia/Manila"
BACKUP_QUEUE = "flood.backups"
MAINTENANCE_QUEUE = "flood.maintenance"
HEARTBEAT_SUFFIX = ".heartbeat"
RUNNING_DIR = "running"  # under the backup directory: one marker per backup task in progress
# A marker this long past its task's time limit means the task died without cleaning up.
_STUCK_GRACE_S = 60


def visibility_timeout(settings: Settings) -> int:
    """Seconds after which Redis hands an unacknowledged task to another worker.

    With acks_late, a worker killed together with its pool child (kill -9 of both, a lost
    host) cannot give its task back, so only this timeout brings it back. It must exceed the
    longest task (BACKUP_TIME_LIMIT_SECONDS) or a slow backup would run twice, and it should
    be short, or a lost backup waits hours. RabbitMQ needs none of this: it redelivers the
    moment the worker's connection drops.
    """
    return int(settings.backup_time_limit_seconds * 1.2) + 10


app = Celery("floodingnaque", set_as_current=False)


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings`` (beat schedule excluded)."""
    return {
        "broker_url": settings.celery_broker,
        "result_backend": settings.celery_backend,
        "broker_connection_retry_on_startup": True,
        # kombu sweeps for tasks past the timeout every interval x throttle seconds (100 s by
        # default): every 10 s keeps the redelivery close to the timeout itself.
        "broker_transport_options": {
            "visibility_timeout": visibility_timeout(settings),
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
        },
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "timezone": TIMEZONE,
        "enable_utc": True,
        # A task is acknowledged when it finishes, and a worker killed mid-task gives it back:
        # a backup interrupted by a restart runs again instead of silently never happening.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": MAINTENANCE_QUEUE,
        "task_routes": {"flood.backup.*": {"queue": BACKUP_QUEUE}},
        "task_track_started": True,
        # Time limits from settings, not the decorators: those run at import.
        "task_annotations": {
            "flood.backup.run": {
                "time_limit": settings.backup_time_limit_seconds,
                # The soft limit lets the task fail cleanly (and record it) before the hard kill.
                "soft_time_limit": settings.backup_time_limit_seconds
                - max(1, min(30, settings.backup_time_limit_seconds // 5)),
            }
        },
        "result_expires": 7 * 24 * 3600,
        "beat_max_loop_interval": 60,
        "beat_scheduler": "ops.tasks:HeartbeatScheduler",
    }


def beat_schedule() -> dict[str, dict[str, Any]]:
    """Periodic tasks; crontab times are Asia/Manila wall-clock (the app's timezone)."""
    return {
        "backup-full-daily": {
            "task": "flood.backup.run",
            "schedule": crontab(minute="0", hour="2", app=app),
            "kwargs": {"kind": "full"},
        },
        "backup-schema-weekly": {
            "task": "flood.backup.run",
            "schedule": crontab(minute="0", hour="3", day_of_week="sun", app=app),
            "kwargs": {"kind": "schema"},
        },
        "backup-cleanup-daily": {
            "task": "flood.backup.cleanup",
            "schedule": crontab(minute="30", hour="4", app=app),
        },
        "backup-sweep-stuck": {
            "task": "flood.backup.sweep",
            "schedule": crontab(minute="*/10", app=app),
        },
        "prediction-log-retention-daily": {
            "task": "flood.prediction_log.retention",
            "schedule": crontab(minute="0", hour="5", app=app),
        },
    }


app.add_defaults(lambda: {**celery_config(get_settings()), "beat_schedule": beat_schedule()})


def next_run_at(entry: str, *, after: datetime) -> datetime:
    """When beat next sends ``entry`` after the aware time ``after``, in Asia/Manila."""
    schedule = app.conf.beat_schedule[entry]["schedule"]
    last_run_at, delta, _ = schedule.remaining_delta(after)
    result: datetime = last_run_at + delta
    return result


class HeartbeatScheduler(PersistentScheduler):  # type: ignore[misc]
    """Beat's scheduler, touching ``<schedule file>.heartbeat`` every loop (at least once a
    minute) so a container healthcheck can tell a live beat from a hung one."""

    def tick(self, *args: Any, **kwargs: Any) -> float:
        heartbeat = Path(f"{self.schedule_filename}{HEARTBEAT_SUFFIX}")
        try:
            heartbeat.touch()
        except OSError:
            logger.exception("cannot touch the beat heartbeat %s", heartbeat)
        interval: float = super().tick(*args, **kwargs)
        return interval


def describe_schedule(*, now: datetime | None = None) -> list[str]:
    """One line per periodic task: its name, task and next run in Philippine time."""
    now = now or datetime.now(UTC)
    return [
        f"{entry:32s} {spec['task']:34s} next {next_run_at(entry, after=now).strftime('%a %Y-%m-%d %H:%M')} "
        f"PHT (Asia/Manila, UTC+8)"
        for entry, spec in app.conf.beat_schedule.items()
    ]


@beat_init.connect  # type: ignore[untyped-decorator]
def _log_schedule(**_: Any) -> None:
    # Operators starting beat should see what it will send and when, not just "beat: Starting".
    for line in describe_schedule():
        logger.info("beat schedule: %s", line)


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _reset_engines(**_: Any) -> None:
    # A forked pool process must not share the parent's database connections.
    dispose_engines()


@app.task(
    name="flood.backup.run",
    bind=True,
    autoretry_for=(BackupError,),
    max_retries=3,
    retry_backoff=300,
    retry_backoff_max=1800,
)  # type: ignore[untyped-decorator]
def run_backup_task(self: Task, kind: backup.BackupKind = "full") -> dict[str, Any]:
    marker = _running_marker(self.request.id, kind=kind)
    try:
        manifest = backup.run_backup(kind=kind)
    finally:
        # Gone however the task ends, except when the process is killed: then the sweep
        # finds it (sweep_stuck_backups).
        marker.unlink(missing_ok=True)
    logger.info("task %s: %s backup %s", self.request.id, kind, manifest.file)
    return {
        "file": manifest.file,
        "kind": manifest.kind,
        "size_bytes": manifest.size_bytes,
        "duration_seconds": manifest.duration_seconds,
        "sha256": manifest.sha256,
        "tables": manifest.tables,
        "alembic_revision": manifest.alembic_revision,
    }


def _running_dir(settings: Settings | None = None) -> Path:
    return (settings or get_settings()).backup_dir / RUNNING_DIR


def _running_marker(task_id: str, *, kind: str) -> Path:
    path = _running_dir() / f"{task_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC).isoformat()
    path.write_text(json.dumps({"task_id": task_id, "kind": kind, "started_at": started}))
    return path


def sweep_stuck_backups(*, settings: Settings | None = None, now: datetime | None = None) -> list[str]:
    """Backups whose task died mid-run (worker SIGKILLed with its child, host lost): past
    their time limit, each is recorded as a failure (``flood_backup_failures_total``) and
    its result marked FAILURE instead of STARTED forever. The ids swept.

    A marker file per running backup, not the result backend: a STARTED result carries no
    start time, and the marker lives beside the catalogue the failure count is kept in. The
    broker still redelivers the task (visibility_timeout); a redelivery that completes sets
    the result to SUCCESS, and the failed attempt stays counted.
    """
    settings = settings or get_settings()
    now = now or datetime.now(UTC)
    limit = settings.backup_time_limit_seconds + _STUCK_GRACE_S
    swept = []
    for path in sorted(_running_dir(settings).glob("*.json")):
        try:
            marker = json.loads(path.read_text())
            started = datetime.fromisoformat(marker["started_at"])
        except (OSError, ValueError, KeyError) as exc:
            logger.error("unreadable backup marker %s (%s): removed", path, exc)
            path.unlink(missing_ok=True)
            continue
        if (now - started).total_seconds() < limit:
            continue
        task_id, kind = str(marker["task_id"]), str(marker.get("kind", "full"))
        error = (
            f"backup task {task_id} did not finish within its time limit of "
            f"{settings.backup_time_limit_seconds} s (its worker was killed?)"
        )
        record_failure(settings.backup_dir, kind=kind, error=error)
        app.backend.mark_as_failure(task_id, BackupError(error))
        path.unlink(missing_ok=True)
        logger.error("%s; marked failed, the broker redelivers it", error)
        swept.append(task_id)
    return swept


@worker_ready.connect  # type: ignore[untyped-decorator]
def _sweep_at_start(**_: Any) -> None:
    # A worker restarted after a crash looks first; beat's sweep covers the rest.
    try:
        sweep_stuck_backups()
    except Exception:
        logger.exception("sweeping stuck backups at worker start failed")


@app.task(name="flood.backup.sweep")  # type: ignore[untyped-decorator]
def sweep_stuck_backups_task() -> dict[str, Any]:
    return {"failed": sweep_stuck_backups()}


@app.task(name="flood.backup.cleanup")  # type: ignore[untyped-decorator]
def cleanup_backups_task() -> dict[str, Any]:
    return {"removed": backup.cleanup_backups()}


@app.task(
    name="flood.prediction_log.retention",
    autoretry_for=(OSError,),
    max_retries=3,
    retry_backoff=600,
)  # type: ignore[untyped-decorator]
def purge_prediction_log_task() -> dict[str, Any]:
    result = retention.purge_prediction_log()
    return {
        "cutoff": result.cutoff.isoformat(),
        "rows_deleted": result.rows_deleted,
        "archive": str(result.archive) if result.archive else None,
    }
