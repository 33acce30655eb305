"""Steady background load with a unique request id per request, for fault tests."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import create_engine, func, select

from ops.tables import PredictionLogRow

DAY = {"temperature": 28, "humidity": 85, "rainfall": 50}
CLIENT_TIMEOUT_S = 35.0  # above the services' 30 s traffic timeout


@dataclass(frozen=True)
class Outcome:
    request_id: str
    started: float  # time.monotonic()
    latency_s: float
    status: int | str  # HTTP status, or the exception's class name


@dataclass
class BackgroundLoad:
    """``concurrency`` threads, each POSTing ``body`` to ``path`` (one observation by
    default), pausing ``pause_s`` between."""

    url: str
    headers: dict[str, str]
    concurrency: int = 4
    pause_s: float = 0.02
    body: dict[str, Any] = field(default_factory=lambda: dict(DAY))
    path: str = "/api/v1/predict"
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._run = uuid.uuid4().hex[:8]
        self._numbers = itertools.count()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> BackgroundLoad:
        for _ in range(self.concurrency):
            thread = threading.Thread(target=self._work, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(CLIENT_TIMEOUT_S + 5)
        return self.outcomes

    def _work(self) -> None:
        with httpx.Client(headers=self.headers, timeout=CLIENT_TIMEOUT_S) as client:
            while not self._stop.is_set():
                with self._lock:
                    request_id = f"{self._run}-{next(self._numbers)}"
                started = time.monotonic()
                status: int | str
                try:
                    answer = client.post(
                        f"{self.url}{self.path}", json=self.body, headers={"X-Request-ID": request_id}
                    )
                    status = answer.status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with self._lock:
                    self.outcomes.append(Outcome(request_id, started, time.monotonic() - started, status))
                time.sleep(self.pause_s)


def statuses(outcomes: list[Outcome]) -> Counter[int | str]:
    return Counter(o.status for o in outcomes)


def answered_ids(outcomes: list[Outcome]) -> list[str]:
    return [o.request_id for o in outcomes if o.status == 200]


def log_counts(database_url: str, ids: list[str], *, column: str = "client_request_id") -> dict[str, int]:
    """How many prediction-log rows each id has (absent ids: none). By default the ids are
    the X-Request-IDs the load sent (stored as client_request_id); ``column="request_id"``
    counts by the server's row ids."""
    engine = create_engine(database_url)
    key = getattr(PredictionLogRow, column)
    counts: dict[str, int] = {}
    try:
        with engine.connect() as connection:
            for start in range(0, len(ids), 1000):
                chunk = ids[start : start + 1000]
                query = select(key, func.count()).where(key.in_(chunk)).group_by(key)
                counts.update({row[0]: row[1] for row in connection.execute(query)})
    finally:
        engine.dispose()
    return counts
