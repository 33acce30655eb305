"""The prediction log: every prediction lands in the database exactly once, off the hot path.

Requests only enqueue a record (microseconds). A writer thread bulk-inserts every
PREDICTION_LOG_FLUSH_MS or PREDICTION_LOG_BATCH_ROWS rows. When the database cannot be
reached, batches go to a JSON-lines journal under FLOOD_HOME/journal (fsynced), and the
journal is replayed once the database answers again. Inserts use ON CONFLICT DO NOTHING on
the unique request_id, so a replay of rows that did land (a commit whose acknowledgement was
lost) cannot duplicate them. ``close()`` drains the queue; what the database will not take
stays in the journal, and the next process on this host replays journals whose writer died.

A journal that cannot be written (directory missing or not a directory, disk full) never
stops the service: it is reported in ``health()`` with the reason, and rows the database
will not take meanwhile are held in memory (up to a bound, then counted as dropped) until
either the database or the journal takes them.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import (
    DBAPIError,
    InterfaceError,
    OperationalError,
    ProgrammingError,
    SQLAlchemyError,
)

from core.errors import ConfigurationError
from core.processes import pid_alive
from core.settings import Settings, get_settings
from ops.database import get_engine
from ops.tables import PredictionLogRow

logger = logging.getLogger(__name__)

_QUEUE_MAX = 100_000
_DEFAULT_RETRY_SECONDS = 5.0


@dataclass(frozen=True)
class PredictionRecord:
    request_id: str
    created_at: datetime
    key_id: str | None
    inputs: dict[str, Any]
    probability: float
    risk_level: str
    model_version: str
    bento_tag: str | None
    latency_ms: float

    def to_json(self) -> str:
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        return json.dumps(data, default=str, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> PredictionRecord:
        data = json.loads(line)
        data["created_at"] = datetime.fromisoformat(data["created_at"])
        return cls(**data)


class _FlushMarker:
    def __init__(self) -> None:
        self.done = threading.Event()


_STOP = object()


_COLUMNS = tuple(field.name for field in fields(PredictionRecord))
_TABLE = PredictionLogRow.__tablename__
# A session-local staging table: COPY cannot skip conflicting rows itself, so rows are
# copied here and moved with INSERT ... ON CONFLICT DO NOTHING in the same transaction.
_STAGE = "flood_prediction_log_stage"
_COLUMN_LIST = ", ".join(_COLUMNS)
_CREATE_STAGE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} ON COMMIT DELETE ROWS "
    f"AS SELECT {_COLUMN_LIST} FROM {_TABLE} WITH NO DATA"
)
_COPY_STAGE = f"COPY {_STAGE} ({_COLUMN_LIST}) FROM STDIN WITH (FORMAT csv, NULL '\\N')"
_MOVE_STAGE = (
    f"INSERT INTO {_TABLE} ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM {_STAGE} "
    "ON CONFLICT (request_id) DO NOTHING"
)
_NULL = "\\N"


def _csv_rows(batch: list[PredictionRecord]) -> io.StringIO:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerows(
        (
            record.request_id,
            record.created_at.isoformat(),
            _NULL if record.key_id is None else record.key_id,
            json.dumps(record.inputs),
            record.probability,
            record.risk_level,
            record.model_version,
            _NULL if record.bento_tag is None else record.bento_tag,
            record.latency_ms,
        )
        for record in batch
    )
    buffer.seek(0)
    return buffer


def _copy_rows(connection: Connection, batch: list[PredictionRecord]) -> None:
    """COPY into a staging table, then one INSERT ... ON CONFLICT DO NOTHING, inside
    ``connection``'s transaction.

    The writer thread shares the API worker's GIL, so the Python spent per row is taken
    from the requests being served. SQLAlchemy's executemany spent ~160 µs per row,
    psycopg2's execute_values ~37 µs (it builds one long SQL string); CSV for COPY is
    built by the C csv module. Driver errors are re-raised as SQLAlchemy's, so the
    transient/permanent handling stays in one place.
    """
    import psycopg2

    cursor = connection.connection.cursor()
    try:
        cursor.execute(_CREATE_STAGE)
        cursor.copy_expert(_COPY_STAGE, _csv_rows(batch))
        cursor.execute(_MOVE_STAGE)
    except psycopg2.Error as exc:
        raise DBAPIError.instance(_COPY_STAGE, None, exc, psycopg2.Error) from exc
    finally:
        cursor.close()


def _is_transient(exc: SQLAlchemyError) -> bool:
    """Errors that a later retry can fix: connectivity, and a schema not yet upgraded."""
    if isinstance(exc, OperationalError | InterfaceError | ProgrammingError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


class PredictionLog:
    """A buffered, crash-tolerant writer for :class:`PredictionRecord` rows."""

    def __init__(
        self,
        *,
        engine: Engine | None = None,
        journal_dir: Path | None = None,
        flush_ms: int | None = None,
        batch_rows: int | None = None,
        retry_seconds: float = _DEFAULT_RETRY_SECONDS,
        queue_rows: int = _QUEUE_MAX,
        settings: Settings | None = None,
    ) -> None:
        settings = settings or get_settings()
        self._engine = engine or get_engine(settings.effective_database_url)
        dialect = self._engine.dialect.name
        if dialect not in ("postgresql", "sqlite"):
            raise ConfigurationError(
                f"DATABASE_URL: the prediction log supports PostgreSQL and SQLite, not {dialect}"
            )
        insert_module: Any = postgresql if dialect == "postgresql" else sqlite
        # Idempotent by request id: replaying a journal never duplicates a row.
        self._statement = insert_module.insert(PredictionLogRow.__table__).on_conflict_do_nothing(
            index_elements=["request_id"]
        )
        self._journal_dir = journal_dir or settings.flood_home.resolve() / "journal"
        self._flush_s = (flush_ms or settings.prediction_log_flush_ms) / 1000
        self._batch_rows = batch_rows or settings.prediction_log_batch_rows
        self._retry_s = retry_seconds
        self._host = socket.gethostname().replace("-", "_")
        self.journal_path = self._journal_dir / f"journal-{self._host}-{os.getpid()}.jsonl"
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_rows)
        self._journal_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._next_retry = 0.0  # monotonic; 0 means the database is believed up
        self._held: list[PredictionRecord] = []  # neither the database nor the journal took them
        self.rows_inserted = 0
        self.rows_journaled = 0
        self.rows_dropped = 0
        self.last_error: str | None = None
        self.journal_error: str | None = None

    # -- request path -----------------------------------------------------------------

    def record_many(self, records: Sequence[PredictionRecord]) -> None:
        """Enqueue one request's records; never blocks on the database."""
        overflow: list[PredictionRecord] = []
        for record in records:
            try:
                self._queue.put_nowait(record)
            except queue.Full:
                overflow.append(record)
        if overflow:
            # The writer is far behind; the journal keeps the rows rather than dropping
            # them, with one fsync per request rather than one per row.
            self._append_journal(overflow)

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._probe_journal()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything recorded so far is in the database or the journal."""
        if self._thread is None:
            return self._queue.empty()
        marker = _FlushMarker()
        self._queue.put(marker)
        return marker.done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Drain the queue, try the journal once more, stop the writer."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("prediction log writer did not stop within %.0f s", timeout)
        self._thread = None

    def health(self) -> dict[str, Any]:
        if self.journal_error is not None:
            self._probe_journal()  # so freed space or a fixed mount shows without an outage
        pending = self._journal_pending()
        degraded = self._next_retry or pending or self.journal_error or self._held
        return {
            "status": "degraded" if degraded else "ok",
            "queued": self._queue.qsize(),
            "journal_pending": pending,
            "rows_inserted": self.rows_inserted,
            "rows_journaled": self.rows_journaled,
            "rows_held": len(self._held),
            "rows_dropped": self.rows_dropped,
            "last_error": self.last_error if self._next_retry else None,
            "journal_error": self.journal_error,
        }

    # -- writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        self._claim_orphan_journals()
        self._replay_journal()
        stopping = False
        while not stopping:
            batch, markers, stopping = self._take_batch()
            if self._held:
                with self._journal_lock:
                    held, self._held = self._held, []
                batch = [*held, *batch]
            if batch:
                self._write(batch)
            if stopping or (self._next_retry and time.monotonic() >= self._next_retry):
                self._replay_journal()
            elif not self._next_retry and self._queue.qsize() < self._batch_rows and self._journal_pending():
                # Rows journaled because the queue overflowed, with the database up: back
                # into it once the writer has caught up, not only at the next outage or stop.
                self._replay_journal()
            for marker in markers:
                marker.done.set()
        if self._held:
            logger.error(
                "prediction log stopped with %d rows neither the database nor the journal took: lost",
                len(self._held),
            )

    def _take_batch(self) -> tuple[list[PredictionRecord], list[_FlushMarker], bool]:
        batch: list[PredictionRecord] = []
        markers: list[_FlushMarker] = []
        deadline = time.monotonic() + self._flush_s
        while len(batch) < self._batch_rows:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=max(remaining, 0.0))
            except queue.Empty:
                break
            if item is _STOP:
                batch.extend(self._drain(markers))
                return batch, markers, True
            if isinstance(item, _FlushMarker):
                markers.append(item)
                break
            batch.append(item)
        return batch, markers, False

    def _drain(self, markers: list[_FlushMarker]) -> Iterator[PredictionRecord]:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _FlushMarker):
                markers.append(item)
            elif item is not _STOP:
                yield item

    def _write(self, batch: list[PredictionRecord]) -> None:
        # While a journal is pending, new rows join it so replay keeps arrival order and
        # there is one path back into the database.
        if self._next_retry or self._journal_pending():
            self._append_journal(batch)
            return
        try:
            self._insert(batch)
        except SQLAlchemyError as exc:
            self._mark_down(exc)
            self._append_journal(batch)

    def _insert(self, batch: list[PredictionRecord]) -> None:
        try:
            with self._engine.begin() as connection:
                if self._engine.dialect.name == "postgresql":
                    _copy_rows(connection, batch)
                else:
                    connection.execute(self._statement, [dict(record.__dict__) for record in batch])
        except SQLAlchemyError as exc:
            if _is_transient(exc):
                raise
            self._insert_one_by_one(batch)
        self.rows_inserted += len(batch)

    def _insert_one_by_one(self, batch: list[PredictionRecord]) -> None:
        # One malformed row must not wedge the journal forever: it goes to a rejects file
        # for a person to look at, and the rest of the batch lands.
        for record in batch:
            try:
                with self._engine.begin() as connection:
                    connection.execute(self._statement, [dict(record.__dict__)])
            except SQLAlchemyError as exc:
                if _is_transient(exc):
                    raise
                logger.error("prediction %s rejected by the database: %s", record.request_id, exc)
                rejects = self._journal_dir / f"rejected-{self._host}-{os.getpid()}.jsonl"
                self._append_lines(rejects, [record.to_json()])

    def _mark_down(self, exc: Exception) -> None:
        first = not self._next_retry
        self._next_retry = time.monotonic() + self._retry_s
        self.last_error = f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}"
        if first:
            logger.error("prediction log database unreachable, journaling (%s)", self.last_error)

    def _journal_pending(self) -> bool:
        try:
            return self.journal_path.stat().st_size > 0
        except OSError:  # no journal, or its directory is not one
            return False

    def _probe_journal(self) -> None:
        """Find out at start, not during an outage, whether the journal can be written."""
        probe = self._journal_dir / f".probe-{self._host}-{os.getpid()}"
        try:
            self._journal_dir.mkdir(parents=True, exist_ok=True)
            self._append_lines(probe, ["{}"])
            probe.unlink()
        except OSError as exc:
            with contextlib.suppress(OSError):
                probe.unlink()
            self._note_journal_failure(exc)
            return
        if self.journal_error is not None:
            logger.warning("prediction journal %s writable again", self._journal_dir)
            self.journal_error = None

    def _append_journal(self, records: list[PredictionRecord]) -> None:
        try:
            self._append_lines(self.journal_path, [record.to_json() for record in records])
        except OSError as exc:
            self._note_journal_failure(exc)
            self._hold(records)
            return
        if self.journal_error is not None:
            logger.warning("prediction journal %s writable again", self._journal_dir)
            self.journal_error = None
        self.rows_journaled += len(records)

    def _note_journal_failure(self, exc: OSError) -> None:
        first = self.journal_error is None
        reason = exc.strerror or exc.__class__.__name__
        self.journal_error = f"journal directory {self._journal_dir} cannot be written: {reason}"
        if first:
            logger.error(
                "%s; predictions are still logged to the database, but rows it cannot take are "
                "only held in memory (at most %d)",
                self.journal_error,
                _QUEUE_MAX,
            )

    def _hold(self, records: list[PredictionRecord]) -> None:
        # Called from the writer thread, and from record() when the queue is full.
        with self._journal_lock:
            self._held.extend(records)
            overflow = len(self._held) - _QUEUE_MAX
            if overflow > 0:
                del self._held[:overflow]
                self.rows_dropped += overflow
        if overflow > 0:
            logger.error("prediction log dropped %d rows: database and journal both unavailable", overflow)

    def _append_lines(self, path: Path, lines: list[str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._journal_lock, path.open("a", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))
            handle.flush()
            os.fsync(handle.fileno())

    def _replay_journal(self) -> None:
        mine = self._journal_dir.glob(f"replaying-{self._host}-{os.getpid()}-*.jsonl")
        for path in [*sorted(mine), self.journal_path]:
            if not self._replay_file(path):
                return
        if self._next_retry:
            logger.warning("prediction log database reachable again; journal replayed")
        self._next_retry = 0.0
        self.last_error = None

    def _replay_file(self, path: Path) -> bool:
        claimed = path
        if not path.name.startswith("replaying-"):
            claimed = self._journal_dir / (f"replaying-{self._host}-{os.getpid()}-{uuid.uuid4().hex}.jsonl")
            # Take the file from the appender first, so rows journaled during the replay
            # start a new file instead of being deleted with this one.
            with self._journal_lock, contextlib.suppress(FileNotFoundError):
                path.rename(claimed)
        if not claimed.is_file():
            return True
        try:
            with claimed.open(encoding="utf-8") as handle:
                chunk: list[PredictionRecord] = []
                for line in handle:
                    if line.strip():
                        chunk.append(PredictionRecord.from_json(line))
                    if len(chunk) >= self._batch_rows:
                        self._insert(chunk)
                        chunk = []
                if chunk:
                    self._insert(chunk)
        except SQLAlchemyError as exc:
            self._mark_down(exc)
            return False
        claimed.unlink()
        logger.info("replayed prediction journal %s", path.name)
        return True

    def _claim_orphan_journals(self) -> None:
        """Adopt journals left by dead writers on this host (crash, kill -9, old worker)."""
        for path in self._journal_dir.glob("*.jsonl"):
            # Names are kind-host-pid[-uuid]; the host has no '-' (see __init__).
            kind, host, pid_text, *_ = [*path.stem.split("-"), "", ""]
            if kind not in ("journal", "replaying") or host != self._host:
                continue
            if not pid_text.isdigit() or int(pid_text) == os.getpid():
                continue
            if pid_alive(int(pid_text)):
                continue
            target = path.with_name(f"replaying-{self._host}-{os.getpid()}-{uuid.uuid4().hex}.jsonl")
            with contextlib.suppress(FileNotFoundError):
                path.rename(target)
                logger.info("adopted prediction journal %s of dead process %s", path.name, pid_text)
