"""The project's Celery app with every backup slowed down first: a fault injected so a test
can kill the worker mid-backup (``celery -A tests.ops.slow_backup worker``)."""

from __future__ import annotations

import os
import time
from typing import Any

from ops import backup, tasks

_run_backup = backup.run_backup


def _slow_run_backup(**kwargs: Any) -> Any:
    time.sleep(float(os.environ.get("FLOOD_TEST_BACKUP_DELAY_S", "5")))
    return _run_backup(**kwargs)


backup.run_backup = _slow_run_backup  # ops.tasks calls it through this module
app = tasks.app
