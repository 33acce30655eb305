"""Every API worker's operations state, so ``/health/detailed`` shows all of them.

A request reaches one API worker, and each worker holds its own rate-limiter client and
prediction-log writer. So each worker publishes its report (the same one its
``/health/detailed`` shows) every :data:`PUBLISH_S` as one JSON file in the server's
multiprocess metrics directory (BentoML's ``PROMETHEUS_MULTIPROC_DIR``: one per server,
shared by its workers, emptied at each start), and the worker that answers reads the
others'. A worker that stops publishing (a blocked event loop, a stopped process) is
``stale`` and degrades health; the file of a worker that has exited is removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from core.processes import pid_alive

logger = logging.getLogger(__name__)

PUBLISH_S = 2.0
# Three missed publications and a margin: a busy loop can be late, not this late.
STALE_AFTER_S = 3 * PUBLISH_S + 2.0
_SUBDIR = "flood-api-workers"
# Summed across workers in the aggregate: counters, not states.
_LOG_TOTALS = ("rows_inserted", "rows_journaled", "rows_rejected", "rows_refused", "rows_pending")
_LIMITER_TOTALS = ("redis_failures", "fallback_decisions")


def state_dir() -> Path | None:
    """Where this server's workers publish, or None outside ``bentoml serve``."""
    base = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(base) / _SUBDIR if base else None


def publish_state(directory: Path, report: dict[str, dict[str, Any]], *, now: float | None = None) -> None:
    """Write this worker's report atomically (readers never see half a file)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{os.getpid()}.json"
    scratch = path.with_suffix(".tmp")
    state = {"pid": os.getpid(), "published_at": now or time.time(), "operations": report}
    scratch.write_text(json.dumps(state))
    scratch.replace(path)


def read_states(directory: Path, *, now: float | None = None) -> list[dict[str, Any]]:
    """Every live worker's last report, with its age; files of exited workers are removed."""
    now = now or time.time()
    states = []
    for path in sorted(directory.glob("*.json")):
        try:
            state = json.loads(path.read_text())
            pid = int(state["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced, or not ours
        if not pid_alive(pid):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        state["age_s"] = round(now - float(state.get("published_at", 0.0)), 1)
        states.append(state)
    return states


def aggregate_states(own: dict[str, dict[str, Any]], others: list[dict[str, Any]]) -> dict[str, Any]:
    """This worker's fresh report and the others' published ones, as one summary."""
    me = os.getpid()
    workers: list[dict[str, Any]] = [{"pid": me, "age_s": 0.0, "operations": own}]
    workers += [s for s in others if s.get("pid") != me]
    summary: list[dict[str, Any]] = []
    degraded: list[int] = []
    stale: list[int] = []
    log_totals = dict.fromkeys(_LOG_TOTALS, 0)
    limiter_totals = dict.fromkeys(_LIMITER_TOTALS, 0)
    for worker in workers:
        operations = worker.get("operations", {})
        log = operations.get("prediction_log", {})
        limiter = operations.get("rate_limiter", {})
        is_stale = worker["age_s"] > STALE_AFTER_S
        statuses = {part: report.get("status") for part, report in operations.items()}
        if is_stale:
            stale.append(worker["pid"])
        elif any(status != "ok" for status in statuses.values()):
            degraded.append(worker["pid"])
        for name in _LOG_TOTALS:
            log_totals[name] += int(log.get(name) or 0)
        for name in _LIMITER_TOTALS:
            limiter_totals[name] += int(limiter.get(name) or 0)
        summary.append(
            {
                "pid": worker["pid"],
                "answered": worker["pid"] == me,
                "age_s": worker["age_s"],
                "stale": is_stale,
                **statuses,
                "problems": log.get("problems", []),
            }
        )
    return {
        "status": "degraded" if degraded or stale else "ok",
        "count": len(workers),
        "degraded": degraded,
        "stale": stale,
        "prediction_log": log_totals,
        "rate_limiter": limiter_totals,
        "workers": summary,
    }
