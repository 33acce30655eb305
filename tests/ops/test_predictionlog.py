"""The prediction log: durable before answered, group commit, PostgreSQL outages, read-only
and hung databases, corrupt journals, adoption of dead writers' journals, exactly once."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
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
from ops.predictionlog import (
    PredictionGroup,
    PredictionLog,
    PredictionLogUnavailableError,
    PredictionRecord,
    _copy_rows,
    _Submission,
    is_transient,
    replay_rejected,
)
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
        client_request_id="client-7",
    )


def group_of(*records: PredictionRecord) -> PredictionGroup:
    """One request's rows (they share all but their ids, as make_record's do)."""
    return PredictionGroup.from_records(records)


def record_each(log: PredictionLog, records: list[PredictionRecord]) -> None:
    """Each record as a request of its own."""
    for record in records:
        log.record(group_of(record))


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
    log.record(group_of(record))
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
    assert row["client_request_id"] == "client-7"


def test_duplicate_request_ids_land_once(postgres_url: str) -> None:
    log = PredictionLog(engine=get_engine(postgres_url), flush_ms=20)
    log.start()
    record = make_record()
    for _ in range(3):
        log.record(group_of(record))
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
            log.record(group_of(record))  # the request path: must never fail or block
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
    assert list(flood_home.glob("journal/journal-*.jsonl"))
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
        first.record(group_of(record))
    first.close()  # graceful shutdown: nothing lost although nothing could be inserted
    journaled = list((flood_home / "journal").glob("*.jsonl"))
    assert sum(len(p.read_text().splitlines()) for p in journaled) == 25

    # The next writer on this host adopts and replays the journal once the database is back:
    # the first writer's lock is released, as the kernel releases it when a process dies.
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
        log.record(group_of(record))
    log.flush(10)
    log.close()
    # A journal from before writer locks (named by pid, no lock file): its writer is gone.
    journal = flood_home / "journal" / f"journal-{_host()}-999999999.jsonl"
    journal.write_text("".join(r.to_json() + "\n" for r in records))
    again = PredictionLog(engine=get_engine(postgres_url))
    again.start()
    again.close()
    ids = logged_ids(postgres_url)
    assert sorted(ids) == sorted(r.request_id for r in records)


def _host() -> str:
    return socket.gethostname().replace("-", "_")


class _FlakyEngine:
    """Delegates to a real engine but fails ``begin`` and ``connect`` while ``down`` is set:
    a fault injected at the driver boundary, for the SQLite default."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.dialect = engine.dialect
        self.down = threading.Event()

    def begin(self) -> Any:
        if self.down.is_set():
            raise OperationalError("INSERT", {}, ConnectionError("database is down"))
        return self._engine.begin()

    def connect(self) -> Any:
        if self.down.is_set():
            raise OperationalError("INSERT", {}, ConnectionError("database is down"))
        return self._engine.connect()


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
        log.record(group_of(record))
    log.close()
    with get_engine().connect() as connection:
        count = connection.scalar(select(func.count()).select_from(PredictionLogRow))
        distinct = connection.scalar(text("SELECT COUNT(DISTINCT request_id) FROM prediction_log"))
    assert count == distinct == 30
    assert log.rows_journaled >= 10


def test_rows_beyond_the_queue_bound_still_reach_the_database(postgres_url: str, flood_home: Path) -> None:
    log = PredictionLog(engine=get_engine(postgres_url), flush_ms=20, batch_rows=10, queue_rows=20)
    log.start()
    assert log.flush(10)  # past the writer's start-up adoption
    records = [make_record() for _ in range(200)]
    log.record(group_of(*records))  # far more at once than the queue holds: held, then journaled
    try:
        assert log.flush(10)
        assert sorted(logged_ids(postgres_url)) == sorted(r.request_id for r in records)
        assert not log.health()["journal_pending"] and log.rows_dropped == 0
    finally:
        log.close()


def journal_ids(flood_home: Path) -> set[str]:
    return {
        row_id
        for path in flood_home.glob("journal/journal-*.jsonl")
        for line in path.read_text().splitlines()
        for row_id in PredictionGroup.from_json(line).row_ids
    }


def test_a_durable_commit_returns_only_once_the_rows_are_fsynced_and_shares_fsyncs(
    postgres_url: str, postgres_proxy: FaultyProxy, flood_home: Path
) -> None:
    """Durable before answered, with the database down so only the journal can hold them:
    every committed id is on disk when commit() returns, and concurrent requests share fsyncs."""
    postgres_proxy.stop()
    engine = create_database_engine(postgres_proxy.url_for(postgres_url, 5432), pool_size=1)
    log = PredictionLog(engine=engine, retry_seconds=60, durability="durable")
    log.start()
    records = [make_record() for _ in range(400)]

    async def answer(record: PredictionRecord) -> None:
        await log.commit(group_of(record))
        # What a crash right after the answer would leave: the row must be on disk already.
        assert record.request_id in journal_ids(flood_home)

    async def main() -> None:
        for record in records[:5]:  # one by one, each checked
            await answer(record)
        start = time.perf_counter()
        await asyncio.gather(*(log.commit(group_of(r)) for r in records[5:]))
        elapsed = time.perf_counter() - start
        print(f"5 sequential then 395 concurrent commits: {log.fsyncs} fsyncs in all, {elapsed:.3f} s")

    try:
        asyncio.run(main())
        assert journal_ids(flood_home) >= {r.request_id for r in records}
        assert log.fsyncs < 100, "concurrent requests did not share fsyncs"
    finally:
        log.close()
        engine.dispose()


def test_an_empty_commit_returns_at_once_in_durable_mode(postgres_url: str, flood_home: Path) -> None:
    """An empty batch has no rows to keep; it found a 5 s wait and a 503 (schemathesis)."""
    log = PredictionLog(engine=get_engine(postgres_url), durability="durable")
    log.start()
    try:
        started = time.perf_counter()
        no_rows = dataclasses.replace(
            group_of(make_record()), row_ids=(), inputs_json=(), probabilities=(), risk_levels=()
        )
        asyncio.run(log.commit(no_rows))

        async def empty_group() -> None:
            # What a request with no rows would wait on, should one reach the journal thread.
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            log._incoming.put(_Submission(None, future, asyncio.get_running_loop()))
            await asyncio.wait_for(future, 2)

        asyncio.run(empty_group())
        assert time.perf_counter() - started < 1.0
    finally:
        log.close()


def test_async_durability_does_not_wait(postgres_url: str, flood_home: Path) -> None:
    log = PredictionLog(engine=get_engine(postgres_url), durability="async")
    log.start()
    try:
        asyncio.run(log.commit(group_of(make_record())))
        assert log.fsyncs == 0 or log.flush(10)  # returned before (or regardless of) the fsync
        assert log.flush(10)
        assert len(logged_ids(postgres_url)) == 1
    finally:
        log.close()


def test_a_truncated_journal_line_is_quarantined_and_logging_goes_on(
    postgres_url: str, flood_home: Path
) -> None:
    """The issue's reproduction: a dead writer's journal ending in a truncated line (a full
    disk). The valid rows land, the bad line is moved aside and named in health, and rows
    recorded afterwards still land."""
    good = [make_record() for _ in range(3)]
    journal = flood_home / "journal" / f"journal-{_host()}-999999998.jsonl"
    journal.parent.mkdir(parents=True)
    journal.write_text("".join(r.to_json() + "\n" for r in good) + '{"request_id": "x", "created_at": "2026-')
    log = PredictionLog(engine=get_engine(postgres_url), flush_ms=20)
    log.start()
    try:
        assert log.flush(10)
        later = make_record()
        log.record(group_of(later))
        assert log.flush(10)
        health = log.health()
        assert sorted(logged_ids(postgres_url)) == sorted(r.request_id for r in [*good, later])
        assert log.lines_quarantined == 1
        assert health["status"] == "degraded" and "quarantined" in " ".join(health["problems"]), health
        (quarantine,) = flood_home.glob("journal/quarantine-*.jsonl")
        (kept,) = [json.loads(line) for line in quarantine.read_text().splitlines()]
        assert kept["line"] == '{"request_id": "x", "created_at": "2026-'  # kept as it was, for a person
        assert all(t.is_alive() for t in threading.enumerate() if t.name.startswith("prediction-"))
    finally:
        log.close()


@pytest.fixture
def scratch_url() -> Iterator[str]:
    from tests.conftest import fresh_postgres_database

    with fresh_postgres_database("flood_log") as url:
        upgrade_database(url)
        yield url


def _alter_database(url: str, statement: str) -> None:
    from sqlalchemy.engine import make_url

    admin = create_engine(make_url(url).set(database="test"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(statement.format(db=make_url(url).database)))
    admin.dispose()


def test_a_read_only_database_keeps_rows_in_the_journal_not_rejected(
    scratch_url: str, flood_home: Path
) -> None:
    """A demoted primary (default_transaction_read_only=on): SQLSTATE 25006 is transient."""
    _alter_database(scratch_url, 'ALTER DATABASE "{db}" SET default_transaction_read_only = on')
    engine = create_database_engine(scratch_url, pool_size=2)
    log = PredictionLog(engine=engine, flush_ms=20, retry_seconds=0.2)
    log.start()
    records = [make_record() for _ in range(50)]
    try:
        record_each(log, records)
        assert log.flush(10)
        health = log.health()
        assert health["status"] == "degraded" and "ReadOnlySqlTransaction" in health["last_error"], health
        assert log.rows_rejected == 0 and not list(flood_home.glob("journal/rejected-*"))
        _alter_database(scratch_url, 'ALTER DATABASE "{db}" SET default_transaction_read_only = off')
        deadline = time.monotonic() + 15
        while log.health()["status"] != "ok" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(logged_ids(scratch_url)) == sorted(r.request_id for r in records)
    finally:
        log.close()
        engine.dispose()


def test_rows_the_database_refuses_for_good_are_counted_and_replayable(
    scratch_url: str, flood_home: Path
) -> None:
    setup = create_engine(scratch_url)
    with setup.begin() as connection:
        connection.execute(
            text("ALTER TABLE prediction_log ADD CONSTRAINT no_bad CHECK (model_version <> 'bad')")
        )
    bad = PredictionRecord(**{**make_record().__dict__, "model_version": "bad"})
    good = [make_record() for _ in range(4)]
    log = PredictionLog(engine=get_engine(scratch_url), flush_ms=20)
    log.start()
    try:
        record_each(log, [*good[:2], bad, *good[2:]])
        assert log.flush(10)
        health = log.health()
        assert log.rows_rejected == 1 and health["rows_rejected"] == 1
        assert health["status"] == "degraded" and "rejected" in " ".join(health["problems"]), health
        assert sorted(logged_ids(scratch_url)) == sorted(r.request_id for r in good)
    finally:
        log.close()

    assert replay_rejected(engine=get_engine(scratch_url)).still_rejected == 1  # the cause is still there
    with setup.begin() as connection:
        connection.execute(text("ALTER TABLE prediction_log DROP CONSTRAINT no_bad"))
    setup.dispose()
    result = replay_rejected(engine=get_engine(scratch_url))
    assert (result.replayed, result.still_rejected) == (1, 0)
    assert sorted(logged_ids(scratch_url)) == sorted(r.request_id for r in [*good, bad])
    assert not list(flood_home.glob("journal/rejected-*"))


def test_a_hung_database_costs_no_memory_and_shows_within_seconds(
    postgres_url: str, postgres_proxy: FaultyProxy, flood_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL hung (bytes accepted, nothing answered): commits still return at once from
    the journal, rows wait on disk rather than in memory, health says so; all land after."""
    monkeypatch.setattr("ops.predictionlog._STALL_SECONDS", 1.0)
    engine = create_database_engine(postgres_proxy.url_for(postgres_url, 5432), pool_size=2)
    log = PredictionLog(engine=engine, flush_ms=20, batch_rows=50, retry_seconds=0.2)
    log.start()
    records = [make_record() for _ in range(600)]
    try:
        assert log.flush(10)
        postgres_proxy.hang()

        async def commit_all() -> float:
            slowest = 0.0
            for start in range(0, 600, 20):
                began = time.perf_counter()
                await asyncio.gather(*(log.commit(group_of(r)) for r in records[start : start + 20]))
                slowest = max(slowest, time.perf_counter() - began)
                await asyncio.sleep(0.005)
            return slowest

        slowest = asyncio.run(commit_all())
        time.sleep(1.5)
        health = log.health()
        print(f"hung database: slowest commit group {slowest * 1000:.1f} ms, health {health['problems']}")
        assert slowest < 0.5
        assert health["status"] == "degraded" and health["rows_pending"] >= 550, health
        assert log._pending_memory_rows <= 50_000
        postgres_proxy.resume()
        deadline = time.monotonic() + 30
        while len(logged_ids(postgres_url)) < 600 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sorted(logged_ids(postgres_url)) == sorted(r.request_id for r in records)
    finally:
        postgres_proxy.resume()
        log.close()
        engine.dispose()


def test_a_durable_request_is_refused_when_neither_journal_nor_database_can_keep_it(
    postgres_url: str, postgres_proxy: FaultyProxy, flood_home: Path
) -> None:
    (flood_home / "journal").parent.mkdir(parents=True, exist_ok=True)
    (flood_home / "journal").write_text("not a directory\n")  # the journal cannot be written
    engine = create_database_engine(postgres_proxy.url_for(postgres_url, 5432), pool_size=1)
    log = PredictionLog(engine=engine, retry_seconds=0.1)
    log.start()
    try:
        first = make_record()
        asyncio.run(log.commit(group_of(first)))  # database up: committed straight into it
        assert logged_ids(postgres_url) == [first.request_id]
        postgres_proxy.stop()
        with pytest.raises(PredictionLogUnavailableError):
            asyncio.run(log.commit(group_of(make_record())))
        assert log.rows_refused == 1 and log.health()["status"] == "degraded"
    finally:
        log.close()
        engine.dispose()


def test_a_failing_writer_is_restarted_and_never_reported_ok(
    postgres_url: str, flood_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = PredictionLog(engine=get_engine(postgres_url), flush_ms=20)
    log.start()
    broken = threading.Event()
    broken.set()
    append = log._append_segment

    def faulty_append(records: list[PredictionGroup]) -> None:  # a bug, injected
        if broken.is_set():
            raise RuntimeError("injected writer bug")
        append(records)

    monkeypatch.setattr(log, "_append_segment", faulty_append)
    try:
        with pytest.raises(PredictionLogUnavailableError):
            asyncio.run(log.commit(group_of(make_record())))  # refused, not left waiting
        health = log.health()
        assert health["status"] == "degraded" and "restarting" in " ".join(health["problems"]), health
        broken.clear()
        time.sleep(1.0)
        record = make_record()
        asyncio.run(log.commit(group_of(record)))
        assert log.flush(10)
        assert logged_ids(postgres_url) == [record.request_id]
        assert log.writer_restarts >= 1 and log.health()["status"] == "ok"
    finally:
        log.close()


@pytest.mark.parametrize(
    ("sqlstate", "transient"),
    [
        ("08006", True),  # connection failure
        ("25006", True),  # read-only transaction
        ("40001", True),  # serialization failure
        ("53100", True),  # disk full
        ("57P01", True),  # admin shutdown
        ("57014", True),  # statement timeout
        ("42P01", True),  # table missing: schema not upgraded yet
        ("23505", False),  # unique violation
        ("22001", False),  # value too long
    ],
)
def test_transient_is_decided_by_sqlstate_class(sqlstate: str, transient: bool) -> None:
    from sqlalchemy.exc import DBAPIError

    class DriverError(Exception):
        pgcode = sqlstate

    assert is_transient(DBAPIError("INSERT", {}, DriverError())) is transient


def test_a_group_is_one_journal_line_and_reads_back_whole() -> None:
    base = make_record()
    records = [
        dataclasses.replace(base, request_id=f"r#{i}", inputs={"rainfall": float(i)}) for i in range(3)
    ]
    group = group_of(*records)
    line = group.to_json()
    assert "\n" not in line
    back = PredictionGroup.from_json(line)
    assert back == group and back.records() == records
    # A line as journals before groups wrote them: one row.
    assert PredictionGroup.from_json(records[0].to_json()).records() == records[:1]
    torn = line.replace('"risk_levels":["Alert","Alert","Alert"]', '"risk_levels":["Alert"]')
    with pytest.raises(ValueError, match="line up"):
        PredictionGroup.from_json(torn)


def test_a_batch_group_lands_as_one_row_each(postgres_url: str, flood_home: Path) -> None:
    records = [dataclasses.replace(make_record(), inputs={"rainfall": float(i)}) for i in range(300)]
    log = PredictionLog(engine=get_engine(postgres_url), flush_ms=20, batch_rows=100)
    log.start()
    try:
        asyncio.run(log.commit(group_of(*records)))
        assert log.flush(10)
    finally:
        log.close()
    engine = create_engine(postgres_url)
    with engine.connect() as connection:
        rows: dict[str, dict[str, float]] = dict(
            connection.execute(
                select(PredictionLogRow.request_id, PredictionLogRow.inputs).where(
                    PredictionLogRow.request_id.in_([r.request_id for r in records])
                )
            ).all()
        )
    engine.dispose()
    assert rows == {r.request_id: r.inputs for r in records}


@pytest.mark.parametrize("may_exist", [False, True], ids=["direct", "staged"])
def test_copy_keeps_values_with_tabs_newlines_and_backslashes(postgres_url: str, may_exist: bool) -> None:
    """COPY's text format gives tab, newline, CR and backslash meaning; a row holding them
    (an old journal line's inputs, say) lands as it was, beside plain rows of the same batch."""
    odd = dataclasses.replace(
        make_record(),
        inputs={"note": 'tab\there\nnew "line"\r\\N back\\slash', "rainfall": 1e-07},
        client_request_id="c\\N",
        key_id=None,
        bento_tag="tag\twith\ttabs",
    )
    plain = [make_record() for _ in range(3)]
    engine = get_engine(postgres_url)
    with engine.begin() as connection:
        _copy_rows(connection, [group_of(odd), *map(group_of, plain)], may_exist=may_exist)
    with engine.connect() as connection:
        rows = {
            row.request_id: row
            for row in connection.execute(
                select(PredictionLogRow.__table__).where(
                    PredictionLogRow.request_id.in_([odd.request_id, *(r.request_id for r in plain)])
                )
            )
        }
    landed = rows[odd.request_id]
    assert landed.inputs == odd.inputs
    assert (landed.client_request_id, landed.key_id, landed.bento_tag) == ("c\\N", None, "tag\twith\ttabs")
    assert landed.probability == odd.probability and landed.latency_ms == odd.latency_ms
    assert all(rows[r.request_id].inputs == r.inputs for r in plain) and len(rows) == 4
