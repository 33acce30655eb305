"""The Celery app: scheduled backups, backup retention and prediction-log retention.

Run by ``celery -A ops.tasks worker -Q flood.backups,flood.maintenance`` and
``celery -A ops.tasks beat``. Tasks are thin: they call the plain functions in
:mod:`ops.backup` and :mod:`ops.retention`, retry what a later attempt can fix and return a
JSON summary. Configuration is read from settings when Celery first needs it, not at import.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# Celery ships no type information: its base classes and decorators are Any to mypy, hence
# the targeted ignores on them below.
from celery import Celery, Task
from celery.beat import PersistentScheduler
from celery.schedules import crontab
from celery.signals import beat_init, worker_process_init

from core.errors import BackupError
from core.settings import Settings, get_settings
from ops import backup, retention
from ops.database import dispose_engines

logger = logging.getLogger(__name__)

TIMEZONE = "Asia/Manila"
BACKUP_QUEUE = "flood.backups"
MAINTENANCE_QUEUE = "flood.maintenance"
HEARTBEAT_SUFFIX = ".heartbeat"
# A backup of a large prediction log can take a while; past this the worker kills it.
_BACKUP_TIME_LIMIT_S = 2 * 3600
# Redis redelivers an unacknowledged (acks_late) task after the visibility timeout; it must
# exceed the longest task or a slow backup would run twice.
_VISIBILITY_TIMEOUT_S = _BACKUP_TIME_LIMIT_S + 3600

app = Celery("floodingnaque", set_as_current=False)


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings`` (beat schedule excluded)."""
    return {
        "broker_url": settings.celery_broker,
        "result_backend": settings.celery_backend,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": _VISIBILITY_TIMEOUT_S},
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
    soft_time_limit=_BACKUP_TIME_LIMIT_S - 300,
    time_limit=_BACKUP_TIME_LIMIT_S,
)  # type: ignore[untyped-decorator]
def run_backup_task(self: Task, kind: backup.BackupKind = "full") -> dict[str, Any]:
    manifest = backup.run_backup(kind=kind)
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
