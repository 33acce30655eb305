"""The prediction log: bulk writes, PostgreSQL outages, journal replay, exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.exc import OperationalError

from core.settings import Settings
from ops.database import create_database_engine, get_engine
from ops.migrations import upgrade_database
from ops.predictionlog import PredictionLog, PredictionRecord
from ops.tables import PredictionLogRow
from tests.ops.proxy import FaultyProxy

pytestmark = pytest.mark.postgres


def make_record(request_id: str | None = None) -> PredictionRecord:
    return PredictionRecord(
        request_id=request_id or uuid.uuid4().hex,
        created_at=datetime.now(UTC),
        key_id="fnq_0123456789ab",
        inputs={"temperature": 28.0, "humidity": 80.0, "rainfall": 12.5},
        probability=0.42,
        risk_level="Alert",
        model_version="3",
        bento_tag="flood-risk:abc",
        latency_ms=4.2,
    )


def logged_ids(url: str) -> list[str]:
    engine = create_engine(url)
    with engine.connect() as connection:
        ids = list(connection.scalars(select(PredictionLogRow.request_id)))
    engine.dispose()
    return ids


@pytest.fixture
def postgres_proxy() -> Iterator[FaultyProxy]:
    proxy = FaultyProxy("127.0.0.1", 5432)
    proxy.start()
    yield proxy
    proxy.stop()


def test_records_land_in_postgres_with_every_field(postgres_url: str, flood_home: Path) -> None:
    log = PredictionLog(engine=get_engine(postgres_url), flush_ms=20)
    log.start()
    record = make_record()
    log.record_many([record])
    assert log.flush(10)
    log.close()
    engine = create_engine(postgres_url)
    with engine.connect() as connection:
        row = connection.execute(select(PredictionLogRow.__table__)).mappings().one()
    engine.dispose()
    assert row["request_id"] == record.request_id
    assert row["inputs"] == record.inputs
    assert row["probability"] == pytest.approx(record.probability)
    assert (row["risk_level"], row["model_version"], row["bento_tag"], row["key_id"]) == (
        "Alert",
        "3",
        "flood-risk:abc",
        "fnq_0123456789ab",
    )
    assert row["created_at"] == record.created_at


def test_duplicate_request_ids_land_once(postgres_url: str) -> None:
    log = PredictionLog(engine=get_engine(postgres_url), flush_ms=20)
    log.start()
    record = make_record()
    for _ in range(3):
        log.record_many([record])
        log.flush(10)
    log.close()
    assert logged_ids(postgres_url) == [record.request_id]


def test_postgres_outage_while_predictions_run(
    postgres_url: str, postgres_proxy: FaultyProxy, flood_home: Path
) -> None:
    """The issue's scenario: requests keep succeeding through the outage, and after the
    server returns every request id is in the table exactly once."""
    engine = create_database_engine(postgres_proxy.url_for(postgres_url, 5432), pool_size=2)
    log = PredictionLog(engine=engine, flush_ms=20, batch_rows=50, retry_seconds=0.2)
    log.start()
    sent: list[str] = []
    enqueue_times: list[float] = []

    def predict(count: int) -> None:
        for _ in range(count):
            record = make_record()
            start = time.perf_counter()
            log.record_many([record])  # the request path: must never fail or block
            enqueue_times.append(time.perf_counter() - start)
            sent.append(record.request_id)
            time.sleep(0.002)

    predict(100)
    assert log.flush(10)
    postgres_proxy.stop()
    predict(300)
    assert log.flush(10)
    assert log.health()["status"] == "degraded"
    assert log.rows_journaled >= 250
    assert log.journal_path.is_file() or list(log.journal_path.parent.glob("replaying-*"))
    postgres_proxy.start()
    predict(100)
    deadline = time.monotonic() + 20
    while log.health()["status"] != "ok" and time.monotonic() < deadline:
        time.sleep(0.1)
        log.flush(5)
    log.close()
    engine.dispose()

    ids = logged_ids(postgres_url)
    assert len(ids) == len(set(ids)) == 500
    assert set(ids) == set(sent)
    assert max(enqueue_times) < 0.05
    assert not list(flood_home.glob("journal/*.jsonl"))


def test_close_with_database_down_keeps_everything_in_the_journal(
    postgres_url: str, postgres_proxy: FaultyProxy, flood_home: Path
) -> None:
    url = postgres_proxy.url_for(postgres_url, 5432)
    postgres_proxy.stop()
    first = PredictionLog(engine=create_database_engine(url, pool_size=1), retry_seconds=0.1)
    first.start()
    records = [make_record() for _ in range(25)]
    for record in records:
        first.record_many([record])
    first.close()  # graceful shutdown: nothing lost although nothing could be inserted
    journaled = list((flood_home / "journal").glob("*.jsonl"))
    assert sum(len(p.read_text().splitlines()) for p in journaled) == 25

    # The next process on this host (here: the same one, journal renamed to a dead pid's)
    # adopts and replays the journal once the database is back.
    dead_pid = _dead_pid()
    for path in journaled:
        path.rename(path.with_name(path.name.replace(str(os.getpid()), str(dead_pid))))
    postgres_proxy.start()
    second = PredictionLog(engine=get_engine(postgres_url), retry_seconds=0.1)
    second.start()
    second.flush(10)
    second.close()
    assert sorted(logged_ids(postgres_url)) == sorted(r.request_id for r in records)
    assert not list((flood_home / "journal").glob("*.jsonl"))


def test_replaying_rows_that_already_landed_does_not_duplicate(postgres_url: str, flood_home: Path) -> None:
    """A commit whose acknowledgement was lost: the rows are in the table and journaled."""
    records = [make_record() for _ in range(10)]
    log = PredictionLog(engine=get_engine(postgres_url), flush_ms=20)
    log.start()
    for record in records[:6]:
        log.record_many([record])
    log.flush(10)
    log.close()
    journal = log.journal_path
    journal.parent.mkdir(parents=True, exist_ok=True)
    journal.write_text("".join(r.to_json() + "\n" for r in records))
    again = PredictionLog(engine=get_engine(postgres_url))
    again.start()
    again.close()
    ids = logged_ids(postgres_url)
    assert sorted(ids) == sorted(r.request_id for r in records)


class _FlakyEngine:
    """Delegates to a real engine but fails ``begin`` while ``down`` is set: a fault
    injected at the driver boundary, for the SQLite default."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.dialect = engine.dialect
        self.down = threading.Event()

    def begin(self) -> Any:
        if self.down.is_set():
            raise OperationalError("INSERT", {}, ConnectionError("database is down"))
        return self._engine.begin()


def test_sqlite_default_with_injected_outage(settings: Settings, flood_home: Path) -> None:
    upgrade_database()
    flaky = _FlakyEngine(get_engine())
    log = PredictionLog(engine=flaky, flush_ms=10, retry_seconds=0.05)  # type: ignore[arg-type]
    log.start()
    records = [make_record() for _ in range(30)]
    for index, record in enumerate(records):
        if index == 10:
            log.flush(10)
            flaky.down.set()
        if index == 20:
            log.flush(10)
            flaky.down.clear()
        log.record_many([record])
    log.close()
    with get_engine().connect() as connection:
        count = connection.scalar(select(func.count()).select_from(PredictionLogRow))
        distinct = connection.scalar(text("SELECT COUNT(DISTINCT request_id) FROM prediction_log"))
    assert count == distinct == 30
    assert log.rows_journaled >= 10


def _dead_pid() -> int:
    process = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    return int(process.stdout)


def test_rows_journaled_when_the_queue_overflows_reach_the_database_without_an_outage(
    postgres_url: str, flood_home: Path
) -> None:
    log = PredictionLog(engine=get_engine(postgres_url), flush_ms=20, batch_rows=10, queue_rows=20)
    log.start()
    assert log.flush(10)  # past the writer's start-up replay
    records = [make_record() for _ in range(200)]
    log.record_many(records)  # far more at once than the queue holds
    assert log.rows_journaled > 0
    deadline = time.monotonic() + 20
    while len(logged_ids(postgres_url)) < len(records) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert sorted(logged_ids(postgres_url)) == sorted(r.request_id for r in records)
        assert not log.health()["journal_pending"]
    finally:
        log.close()
