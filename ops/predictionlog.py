"""The prediction log: every answered prediction is durable before its answer is sent.

Two threads per process, each supervised (an exception is logged, counted and the loop
restarts; health is degraded meanwhile):

- **prediction-journal** (the write path). Requests hand their rows to a queue, one item per
  request. The thread takes everything waiting, appends it to the current journal segment
  under FLOOD_HOME/journal and fsyncs once for all of it, then wakes the requests: group
  commit, since while one fsync runs the next group gathers. With
  PREDICTION_LOG_DURABILITY=durable (the default) a request is answered only after that;
  with ``async`` it does not wait, and a crash can lose the rows of the last few
  milliseconds. If the journal cannot be written (disk full, directory gone) the group is
  committed straight into the database instead; if that fails too, durable requests are
  refused (the edge answers 503) rather than answered unlogged, and async rows are held in
  memory up to a bound.
- **prediction-log** (the ship path). Segments are closed every PREDICTION_LOG_FLUSH_MS or
  PREDICTION_LOG_BATCH_ROWS rows; this thread copies them into the database in order and
  deletes each once committed. While the database is down, read-only, or hung (connect and
  statement timeouts bound each attempt), segments simply wait on disk, not in memory, and
  are retried every few seconds. Inserts are idempotent by request id (ON CONFLICT DO
  NOTHING), so a segment shipped twice (a crash between commit and delete) lands once.

Each writer holds an exclusive ``flock`` on ``writer-<host>-<nonce>.lock`` while it lives; the
kernel releases it when the process dies however it dies, so the next writer on the host
adopts that writer's segments (kill -9, host loss, a container restarted with the same pid).
A line that does not parse (a truncated write on a full disk) is moved to a quarantine file
and counted; every valid line is still shipped. Rows the database refuses for good (a
constraint that can never pass) go to ``rejected-*.jsonl``, counted, for
``flood db replay-rejected``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import io
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Connection, Engine
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import (
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    ProgrammingError,
    SQLAlchemyError,
)

from core.errors import ConfigurationError, DependencyUnavailableError
from core.settings import Settings, get_settings
from ops.database import create_database_engine
from ops.tables import PredictionLogRow

logger = logging.getLogger(__name__)

_QUEUE_MAX = 100_000  # rows waiting for the journal thread
_MEMORY_ROWS = 50_000  # rows of closed segments kept in memory for shipping; beyond, read back from disk
_DEFAULT_RETRY_SECONDS = 5.0
# The shipper is "stalled" (health degraded) when the oldest unshipped segment is this old:
# a hung database shows within seconds even though no call has failed yet.
_STALL_SECONDS = 10.0
_SUPERVISOR_BACKOFF_S = 0.5
_ORPHAN_SCAN_S = 30.0


class PredictionLogUnavailableError(DependencyUnavailableError):
    """Neither the journal nor the database took a request's rows in time: the request must
    not be answered, or its prediction would go unlogged."""


@dataclass(frozen=True)
class PredictionRecord:
    request_id: str  # the server's id: the log's unique key
    created_at: datetime
    key_id: str | None
    inputs: dict[str, Any]
    probability: float
    risk_level: str
    model_version: str
    bento_tag: str | None
    latency_ms: float
    client_request_id: str | None = None  # X-Request-ID as the client sent it, if valid

    def to_json(self) -> str:
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        return json.dumps(data, default=str, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> PredictionRecord:
        """Raises ``ValueError`` (``json.JSONDecodeError`` included), ``KeyError`` or
        ``TypeError`` for a line that is not a record."""
        data = json.loads(line)
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        data["created_at"] = datetime.fromisoformat(data["created_at"])
        return cls(**data)


@dataclass(frozen=True)
class PredictionGroup:
    """One request's predictions: what its rows share, then one entry per row in each tuple.

    The request path builds one of these per request, not one object per row, and each
    row's inputs arrive as JSON text (pydantic writes it), used as-is in the journal line and
    in the COPY data: the log's Python cost per row is a few tuple entries and a line of COPY text.
    """

    request_id: str  # the server's id for the request (row ids derive from it)
    created_at: datetime
    key_id: str | None
    model_version: str
    bento_tag: str | None
    latency_ms: float
    client_request_id: str | None
    row_ids: tuple[str, ...]  # the log's unique keys
    inputs_json: tuple[str, ...]  # one JSON object per row
    probabilities: tuple[float, ...]
    risk_levels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.row_ids)

    @classmethod
    def from_records(cls, records: Sequence[PredictionRecord]) -> PredictionGroup:
        """Rows that share a request (or a one-row group per row read from an old journal)."""
        first = records[0]
        return cls(
            request_id=first.request_id,
            created_at=first.created_at,
            key_id=first.key_id,
            model_version=first.model_version,
            bento_tag=first.bento_tag,
            latency_ms=first.latency_ms,
            client_request_id=first.client_request_id,
            row_ids=tuple(r.request_id for r in records),
            inputs_json=tuple(json.dumps(r.inputs) for r in records),
            probabilities=tuple(r.probability for r in records),
            risk_levels=tuple(r.risk_level for r in records),
        )

    def records(self) -> list[PredictionRecord]:
        """One record per row (SQLite inserts, rows inserted one by one, the rejects file)."""
        return [
            PredictionRecord(
                request_id=row_id,
                created_at=self.created_at,
                key_id=self.key_id,
                inputs=json.loads(inputs),
                probability=probability,
                risk_level=risk_level,
                model_version=self.model_version,
                bento_tag=self.bento_tag,
                latency_ms=self.latency_ms,
                client_request_id=self.client_request_id,
            )
            for row_id, inputs, probability, risk_level in zip(
                self.row_ids, self.inputs_json, self.probabilities, self.risk_levels, strict=True
            )
        ]

    def to_json(self) -> str:
        """One journal line; the rows' inputs are spliced in as the JSON they already are."""
        shared = json.dumps(
            {
                "group": self.request_id,
                "created_at": self.created_at.isoformat(),
                "key_id": self.key_id,
                "model_version": self.model_version,
                "bento_tag": self.bento_tag,
                "latency_ms": self.latency_ms,
                "client_request_id": self.client_request_id,
                "row_ids": self.row_ids,
                "probabilities": self.probabilities,
                "risk_levels": self.risk_levels,
            },
            separators=(",", ":"),
        )
        return f'{shared[:-1]},"inputs":[{",".join(self.inputs_json)}]}}'

    @classmethod
    def from_json(cls, line: str) -> PredictionGroup:
        """A journal line: a group, or one row as journals before groups wrote them. Raises
        ``ValueError`` (``json.JSONDecodeError`` included), ``KeyError`` or ``TypeError``
        for a line that is neither."""
        data = json.loads(line)
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        if "group" not in data:
            return cls.from_records([PredictionRecord.from_json(line)])
        inputs = data["inputs"]
        group = cls(
            request_id=str(data["group"]),
            created_at=datetime.fromisoformat(data["created_at"]),
            key_id=data["key_id"],
            model_version=str(data["model_version"]),
            bento_tag=data["bento_tag"],
            latency_ms=float(data["latency_ms"]),
            client_request_id=data["client_request_id"],
            row_ids=tuple(data["row_ids"]),
            inputs_json=tuple(json.dumps(row) for row in inputs),
            probabilities=tuple(float(p) for p in data["probabilities"]),
            risk_levels=tuple(data["risk_levels"]),
        )
        if len({len(group.row_ids), len(inputs), len(group.probabilities), len(group.risk_levels)}) != 1:
            raise ValueError("a group whose rows do not line up")
        return group


def _rows(groups: Sequence[PredictionGroup]) -> int:
    return sum(len(group) for group in groups)


def _chunks(groups: Sequence[PredictionGroup], rows: int) -> list[list[PredictionGroup]]:
    """Consecutive groups, about ``rows`` rows per chunk (a larger group is a chunk of its own)."""
    chunks: list[list[PredictionGroup]] = []
    current: list[PredictionGroup] = []
    size = 0
    for group in groups:
        if current and size + len(group) > rows:
            chunks.append(current)
            current, size = [], 0
        current.append(group)
        size += len(group)
    if current:
        chunks.append(current)
    return chunks


_COLUMNS = tuple(f.name for f in fields(PredictionRecord))
_TABLE = PredictionLogRow.__tablename__
_COLUMN_LIST = ", ".join(_COLUMNS)
_COPY_TABLE = f"COPY {_TABLE} ({_COLUMN_LIST}) FROM STDIN"  # text format; NULL is \\N
# A session-local staging table for segments that may already have landed (read back from
# disk): COPY cannot skip conflicting rows itself, so they are copied here and moved with
# INSERT ... ON CONFLICT DO NOTHING in the same transaction.
_STAGE = "flood_prediction_log_stage"
_CREATE_STAGE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} ON COMMIT DELETE ROWS "
    f"AS SELECT {_COLUMN_LIST} FROM {_TABLE} WITH NO DATA"
)
_COPY_STAGE = f"COPY {_STAGE} ({_COLUMN_LIST}) FROM STDIN"
_MOVE_STAGE = (
    f"INSERT INTO {_TABLE} ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM {_STAGE} "
    "ON CONFLICT (request_id) DO NOTHING"
)
_NULL = "\\N"
# SQLSTATE classes a later attempt can get past: connection exception (08), invalid
# transaction state (25: a read-only standby or demoted primary), transaction rollback (40:
# serialization, deadlock), insufficient resources (53), operator intervention (57: admin
# shutdown, statement timeout).
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "25", "40", "53", "57"})
# Undefined table / column: a schema not upgraded yet; `flood db upgrade` fixes it.
_TRANSIENT_SQLSTATES = frozenset({"42P01", "42703"})


def is_transient(exc: SQLAlchemyError) -> bool:
    """Whether a later retry can succeed where ``exc`` failed; permanent errors are the
    rows' own (a constraint they can never pass)."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    code = getattr(getattr(exc, "orig", None), "pgcode", None)
    if isinstance(code, str) and code:
        return code[:2] in _TRANSIENT_SQLSTATE_CLASSES or code in _TRANSIENT_SQLSTATES
    return isinstance(exc, OperationalError | InterfaceError | ProgrammingError)


_COPY_SPECIALS = ("\\", "\t", "\n", "\r")
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_value(value: object) -> str:
    """One value in COPY's text format: NULL as ``\\N``; backslash, tab, newline and CR escaped."""
    if value is None:
        return _NULL
    return str(value).translate(_COPY_ESCAPES)


def _copy_text(batch: Sequence[PredictionGroup]) -> io.StringIO:
    """``batch``'s rows as COPY text: one format per row, with the values a group's rows share
    written once.

    The csv module cost ~3.3 us per row here (it quotes every inputs JSON and doubles its
    quotes), paid on the API worker's GIL; text format needs escaping only for backslash,
    tab, newline and CR, which the rows the routes write never hold (numbers, ids, labels),
    so a group is escaped value by value only when one of them turns up.
    """
    buffer = io.StringIO()
    for group in batch:
        shared = (group.created_at.isoformat(), group.key_id)
        tail = (group.model_version, group.bento_tag, str(group.latency_ms), group.client_request_id)
        head = "\t".join(_copy_value(v) for v in shared)
        end = "\t".join(_copy_value(v) for v in tail)
        row_ids, inputs_json, levels = group.row_ids, group.inputs_json, group.risk_levels
        varying = "".join((*row_ids, *inputs_json, *set(levels)))
        if any(special in varying for special in _COPY_SPECIALS):
            row_ids, inputs_json, levels = (
                tuple(map(_copy_value, v)) for v in (row_ids, inputs_json, levels)
            )
        buffer.writelines(
            f"{row_id}\t{head}\t{inputs}\t{probability}\t{level}\t{end}\n"
            for row_id, inputs, probability, level in zip(
                row_ids, inputs_json, group.probabilities, levels, strict=True
            )
        )
    buffer.seek(0)
    return buffer


def _copy_rows(connection: Connection, batch: Sequence[PredictionGroup], *, may_exist: bool) -> None:
    """COPY ``batch`` inside ``connection``'s transaction: straight into the table, or through
    the staging table when some rows may already be there (``may_exist``).

    The writer threads share the API worker's GIL, so the Python spent per row is taken from
    the requests being served (hence :func:`_copy_text`). Driver errors are
    re-raised as SQLAlchemy's, so the transient/permanent handling stays in one place.
    """
    import psycopg2

    cursor = connection.connection.cursor()
    try:
        if may_exist:
            cursor.execute(_CREATE_STAGE)
            cursor.copy_expert(_COPY_STAGE, _copy_text(batch))
            cursor.execute(_MOVE_STAGE)
        else:
            cursor.copy_expert(_COPY_TABLE, _copy_text(batch))
    except psycopg2.Error as exc:
        raise DBAPIError.instance(_COPY_TABLE, None, exc, psycopg2.Error) from exc
    finally:
        cursor.close()


@dataclass
class _Segment:
    """A closed journal file waiting to be shipped; ``groups`` is None once only the disk has them."""

    path: Path
    rows: int
    groups: list[PredictionGroup] | None
    # Opened at while it is being written, closed at once it waits for the shipper.
    since: float = field(default_factory=time.monotonic)
    may_exist: bool = False  # read back from disk: some rows may have landed before a crash
    counted_as_waiting: bool = False


class _Marker:
    """flush(): set when everything handed in before it is durable and shipped (or the
    database is down and it waits in the journal)."""

    def __init__(self) -> None:
        self.done = threading.Event()


_STOP = object()


@dataclass
class _Submission:
    group: PredictionGroup | None  # None: only wakes the journal thread (rows were held)
    future: asyncio.Future[None] | None = None
    loop: asyncio.AbstractEventLoop | None = None


def _settle(futures: list[asyncio.Future[None]], error: Exception | None) -> None:
    for future in futures:
        if future.done():  # the request gave up waiting (timeout, cancelled)
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


class PredictionLog:
    """A durable, crash-tolerant writer for :class:`PredictionRecord` rows."""

    def __init__(
        self,
        *,
        engine: Engine | None = None,
        journal_dir: Path | None = None,
        flush_ms: int | None = None,
        batch_rows: int | None = None,
        retry_seconds: float = _DEFAULT_RETRY_SECONDS,
        queue_rows: int = _QUEUE_MAX,
        durability: str | None = None,
        settings: Settings | None = None,
    ) -> None:
        settings = settings or get_settings()
        self._owns_engine = engine is None
        self._engine = engine or create_database_engine(
            settings.effective_database_url,
            pool_size=2,
            statement_timeout_ms=settings.prediction_log_statement_timeout_ms,
        )
        dialect = self._engine.dialect.name
        if dialect not in ("postgresql", "sqlite"):
            raise ConfigurationError(
                f"DATABASE_URL: the prediction log supports PostgreSQL and SQLite, not {dialect}"
            )
        insert_module: Any = postgresql if dialect == "postgresql" else sqlite
        self._statement = insert_module.insert(PredictionLogRow.__table__).on_conflict_do_nothing(
            index_elements=["request_id"]
        )
        self.durability = durability or settings.prediction_log_durability
        if self.durability not in ("durable", "async"):
            raise ConfigurationError(f"PREDICTION_LOG_DURABILITY: durable or async, not {self.durability}")
        self._commit_timeout_s = settings.prediction_log_commit_timeout_ms / 1000
        self._journal_dir = journal_dir or settings.flood_home.resolve() / "journal"
        self._flush_s = (flush_ms or settings.prediction_log_flush_ms) / 1000
        self._batch_rows = batch_rows or settings.prediction_log_batch_rows
        self._retry_s = retry_seconds
        self._queue_max = queue_rows
        self._host = socket.gethostname().replace("-", "_")
        # Names are kind-host-nonce[-more]; neither host nor nonce has a '-'.
        self._nonce = uuid.uuid4().hex[:16]
        self._lock_path = self._journal_dir / f"writer-{self._host}-{self._nonce}.lock"
        self._lock_file: IO[bytes] | None = None

        self._incoming: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._incoming_rows = 0
        self._incoming_lock = threading.Lock()
        self._held_lock = threading.Lock()
        self._adopted = False
        self._next_orphan_scan = 0.0
        self._segment_file: IO[bytes] | None = None
        self._segment: _Segment | None = None
        self._segment_seq = 0
        self._pending: collections.deque[_Segment | _Marker | object] = collections.deque()
        self._pending_memory_rows = 0
        self._ship_wakeup = threading.Condition()
        self._threads: dict[str, threading.Thread] = {}
        self._failing: dict[str, str] = {}  # thread name -> last exception, while restarting
        self._next_retry = 0.0  # monotonic; 0 means the database is believed up
        self._held: list[PredictionGroup] = []  # async mode: neither journal nor database took them
        self._held_rows = 0  # their rows, kept as a count: _hold runs per request during an outage

        self.rows_inserted = 0
        self.rows_journaled = 0  # rows that waited in the journal because the database did not take them
        self.rows_rejected = 0
        self.lines_quarantined = 0
        self.rows_refused = 0  # durable requests refused: nothing could make their rows durable
        self.rows_dropped = 0  # async rows lost: neither journal, database nor memory bound took them
        self.fsyncs = 0
        self.writer_restarts = 0
        self.last_error: str | None = None
        self.journal_error: str | None = None

    # -- request path -----------------------------------------------------------------

    def record(self, group: PredictionGroup) -> None:
        """Hand over one request's rows without waiting for them to be durable."""
        if not self._admit(len(group)):
            self._hold([group])
            self._incoming.put(_Submission(None))  # wakes the journal thread, which takes the held rows
            return
        self._incoming.put(_Submission(group))

    async def commit(self, group: PredictionGroup) -> None:
        """Hand over one request's rows; in durable mode, return once they are fsynced to
        the journal or committed in the database, else raise
        :class:`PredictionLogUnavailableError` (within PREDICTION_LOG_COMMIT_TIMEOUT_MS)."""
        if not len(group):
            return
        if self.durability == "async" or self._thread_missing("prediction-journal"):
            if self.durability == "durable":
                self._refuse(group, "the journal writer is not running")
            self.record(group)
            return
        if not self._admit(len(group)):
            self._refuse(group, f"{self._incoming_rows} rows already wait for the journal")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._incoming.put(_Submission(group, future, loop))
        try:
            await asyncio.wait_for(future, self._commit_timeout_s)
        except TimeoutError:
            self._refuse(group, f"not durable within {self._commit_timeout_s:g} s")
        except PredictionLogUnavailableError:
            self.rows_refused += len(group)
            raise

    def _admit(self, rows: int) -> bool:
        with self._incoming_lock:
            if self._incoming_rows + rows > self._queue_max:
                return False
            self._incoming_rows += rows
            return True

    def _refuse(self, group: PredictionGroup, reason: str) -> None:
        self.rows_refused += len(group)
        raise PredictionLogUnavailableError(f"prediction log unavailable: {reason}")

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        if self._threads:
            return
        self._probe_journal()
        self._take_writer_lock()
        for name, body in (("prediction-journal", self._journal_loop), ("prediction-log", self._ship_loop)):
            thread = threading.Thread(target=self._supervise, args=(name, body), name=name, daemon=True)
            self._threads[name] = thread
            thread.start()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything recorded so far is durable and has been offered to the
        database (it is in the database, or in the journal while the database is down)."""
        if not self._threads:
            return self._incoming.empty()
        marker = _Marker()
        self._incoming.put(marker)
        return marker.done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Make everything durable, ship what the database takes, stop both threads; what
        it does not take stays in the journal for the next writer on this host."""
        if not self._threads:
            return
        self._incoming.put(_STOP)
        deadline = time.monotonic() + timeout
        for name, thread in self._threads.items():
            thread.join(max(deadline - time.monotonic(), 0.0))
            if thread.is_alive():
                logger.error("prediction log thread %s did not stop within %.0f s", name, timeout)
        self._threads = {}
        if self._held:
            logger.error(
                "prediction log stopped with %d rows neither the database nor the journal took: lost",
                self._held_rows,
            )
        self._release_writer_lock()
        if self._owns_engine:
            self._engine.dispose()

    def health(self) -> dict[str, Any]:
        if self.journal_error is not None:
            self._probe_journal()  # so freed space or a fixed mount shows without an outage
        with self._ship_wakeup:
            waiting = [s for s in self._pending if isinstance(s, _Segment)]
        oldest = max((time.monotonic() - s.since for s in waiting), default=0.0)
        stalled = oldest >= _STALL_SECONDS
        dead = [name for name, thread in self._threads.items() if not thread.is_alive()]
        quarantine = sorted(p.name for p in self._journal_dir.glob("quarantine-*.jsonl"))
        rejected = sorted(p.name for p in self._journal_dir.glob("rejected-*.jsonl"))
        problems = [
            *(f"{name} thread stopped" for name in dead),
            *(f"{name} thread restarting after {error}" for name, error in self._failing.items()),
            *(["database not taking rows"] if self._next_retry else []),
            *([f"oldest unshipped rows {oldest:.0f} s old"] if stalled else []),
            *([self.journal_error] if self.journal_error else []),
            *([f"{self._held_rows} rows only in memory"] if self._held else []),
            *([f"quarantined journal lines in {', '.join(quarantine)}"] if quarantine else []),
            *([f"rows the database rejected in {', '.join(rejected)}"] if rejected else []),
        ]
        return {
            "status": "degraded" if problems else "ok",
            "problems": problems,
            "durability": self.durability,
            "queued": self._incoming_rows,
            "journal_pending": bool(self._next_retry or stalled or len(waiting) > 2),
            "segments_pending": len(waiting),
            "rows_pending": sum(s.rows for s in waiting),
            "oldest_pending_seconds": round(oldest, 1),
            "rows_inserted": self.rows_inserted,
            "rows_journaled": self.rows_journaled,
            "rows_rejected": self.rows_rejected,
            "lines_quarantined": self.lines_quarantined,
            "rows_refused": self.rows_refused,
            "rows_held": self._held_rows,
            "rows_dropped": self.rows_dropped,
            "writer_restarts": self.writer_restarts,
            "last_error": self.last_error if self._next_retry else None,
            "journal_error": self.journal_error,
        }

    def _thread_missing(self, name: str) -> bool:
        thread = self._threads.get(name)
        return thread is None or not thread.is_alive()

    def _supervise(self, name: str, body: Callable[[], None]) -> None:
        # A bug or an unexpected error must not end logging for the life of the worker:
        # the loop restarts, and health names the failure until it runs again.
        while True:
            try:
                body()
                return
            except Exception as exc:
                self.writer_restarts += 1
                self._failing[name] = f"{exc.__class__.__name__}: {exc}"
                logger.exception("prediction log thread %s failed; restarting it", name)
                time.sleep(_SUPERVISOR_BACKOFF_S)

    # -- journal thread ---------------------------------------------------------------

    def _journal_loop(self) -> None:
        self._failing.pop("prediction-journal", None)
        while True:
            items = self._take_group()
            submissions = [item for item in items if isinstance(item, _Submission)]
            stopping = any(item is _STOP for item in items)
            if submissions or self._held:
                try:
                    self._make_durable(submissions)
                except Exception as exc:
                    # Nobody may wait forever on a group the loop failed on: its requests
                    # are refused, and the supervisor restarts the loop.
                    failure = PredictionLogUnavailableError(f"prediction log failed: {exc}")
                    self._settle_all(submissions, failure)
                    raise
            if self._segment is not None and (
                stopping
                or self._segment.rows >= self._batch_rows
                or time.monotonic() - self._segment.since >= self._flush_s
                or any(isinstance(item, _Marker) for item in items)
            ):
                self._close_segment()
            for item in items:
                if isinstance(item, _Marker):
                    self._to_shipper(item)
            if stopping:
                self._to_shipper(_STOP)
                return

    def _take_group(self) -> list[Any]:
        """Everything waiting, blocking until something is (or the open segment is due)."""
        timeout = None
        if self._segment is not None:
            timeout = max(self._segment.since + self._flush_s - time.monotonic(), 0.0)
        try:
            items = [self._incoming.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self._incoming.get_nowait())
            except queue.Empty:
                return items

    def _make_durable(self, submissions: list[_Submission]) -> None:
        groups = [submission.group for submission in submissions if submission.group is not None]
        with self._incoming_lock:
            self._incoming_rows -= _rows(groups)
        groups = [*self._take_held(), *groups]
        if not _rows(groups):
            self._settle_all(submissions, None)  # e.g. an empty batch: nothing to keep
            return
        error: Exception | None = None
        try:
            self._append_segment(groups)
        except OSError as exc:
            self._note_journal_failure(exc)
            error = self._commit_directly(groups)
        else:
            if self.journal_error is not None:
                logger.warning("prediction journal %s writable again", self._journal_dir)
                self.journal_error = None
        if error is not None and self.durability == "async":
            self._hold(groups)
        self._settle_all(submissions, error)

    @staticmethod
    def _settle_all(submissions: list[_Submission], error: Exception | None) -> None:
        """Wake the requests waiting on ``submissions``: one call into each event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for submission in submissions:
            if submission.future is not None and submission.loop is not None:
                by_loop.setdefault(submission.loop, []).append(submission.future)
        for loop, futures in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, futures, error)

    def _append_segment(self, groups: list[PredictionGroup]) -> None:
        if self._segment_file is None:
            self._open_segment()
        assert self._segment_file is not None and self._segment is not None
        data = "".join(group.to_json() + "\n" for group in groups).encode()
        try:
            self._segment_file.write(data)
            self._segment_file.flush()
            os.fsync(self._segment_file.fileno())
        except OSError:
            # A partial write may have left a truncated line; the segment is closed so the
            # shipper quarantines that line, and the next group starts a new file.
            self._close_segment()
            raise
        self.fsyncs += 1
        self._segment.rows += _rows(groups)
        assert self._segment.groups is not None
        self._segment.groups.extend(groups)

    def _open_segment(self) -> None:
        self._segment_seq += 1
        path = self._journal_dir / f"journal-{self._host}-{self._nonce}-{self._segment_seq:09d}.jsonl"
        self._journal_dir.mkdir(parents=True, exist_ok=True)
        handle = path.open("ab")
        try:
            # The new name must survive a host loss too, not only the data in it.
            directory = os.open(self._journal_dir, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError:
            handle.close()
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        self._segment_file = handle
        self._segment = _Segment(path=path, rows=0, groups=[])

    def _close_segment(self) -> None:
        segment, handle = self._segment, self._segment_file
        self._segment, self._segment_file = None, None
        if handle is not None:
            with contextlib.suppress(OSError):
                handle.close()
        if segment is None:
            return
        if segment.rows == 0:
            with contextlib.suppress(OSError):
                segment.path.unlink()
            return
        segment.since = time.monotonic()
        self._to_shipper(segment)

    def _commit_directly(self, groups: list[PredictionGroup]) -> Exception | None:
        """With the journal unwritable, the database is the only durable place left."""
        try:
            self._insert(groups, may_exist=False)
        except SQLAlchemyError as exc:
            self._mark_down(exc)
            return PredictionLogUnavailableError(
                f"prediction log unavailable: journal ({self.journal_error}) and database ({self.last_error})"
            )
        return None

    def _to_shipper(self, item: _Segment | _Marker | object) -> None:
        with self._ship_wakeup:
            if isinstance(item, _Segment) and item.groups is not None:
                if self._pending_memory_rows + item.rows > _MEMORY_ROWS:
                    item.groups = None  # the database is behind: read it back from disk later
                else:
                    self._pending_memory_rows += item.rows
            self._pending.append(item)
            self._ship_wakeup.notify()

    # -- ship thread ------------------------------------------------------------------

    def _ship_loop(self) -> None:
        self._failing.pop("prediction-log", None)
        while True:
            if not self._adopted or time.monotonic() >= self._next_orphan_scan:
                # At start, and now and then: a sibling worker killed and not restarted
                # leaves segments nobody else would adopt until the next start.
                self._adopt_orphans()
                self._adopted = True
                self._next_orphan_scan = time.monotonic() + _ORPHAN_SCAN_S
            with self._ship_wakeup:
                if not self._pending:
                    self._ship_wakeup.wait(_ORPHAN_SCAN_S)
                if not self._pending:
                    continue
                item = self._pending[0]
            if isinstance(item, _Marker):
                self._pop_pending()
                item.done.set()
                continue
            if item is _STOP:
                self._pop_pending()
                return
            assert isinstance(item, _Segment)
            with self._ship_wakeup:
                stopping = any(other is _STOP for other in self._pending)
            if self._next_retry and time.monotonic() < self._next_retry and not stopping:
                self._wait_for_retry()
                continue
            if self._ship(item):
                self._pop_pending()
                if self._next_retry:
                    logger.warning("prediction log database reachable again; shipping the journal")
                self._next_retry = 0.0
                self.last_error = None
            elif stopping:
                self._leave_for_next_writer()

    def _pop_pending(self) -> None:
        with self._ship_wakeup:
            item = self._pending.popleft()
            if isinstance(item, _Segment) and item.groups is not None:
                self._pending_memory_rows -= item.rows

    def _wait_for_retry(self) -> None:
        """While the database is down: markers are satisfied (their rows are durable in
        the journal), then wait for the retry time, a stop, or a flush."""
        with self._ship_wakeup:
            remaining = [item for item in self._pending if not isinstance(item, _Marker)]
            markers = [item for item in self._pending if isinstance(item, _Marker)]
            self._pending = collections.deque(remaining)
            for segment in remaining:
                if isinstance(segment, _Segment) and not segment.counted_as_waiting:
                    segment.counted_as_waiting = True
                    self.rows_journaled += segment.rows
            for marker in markers:
                marker.done.set()
            if not any(item is _STOP for item in self._pending):
                self._ship_wakeup.wait(max(self._next_retry - time.monotonic(), 0.0))

    def _leave_for_next_writer(self) -> None:
        """Stopping with the database down: the segments stay on disk, adopted by the next
        writer on this host once this one's lock is released."""
        with self._ship_wakeup:
            kept = [item for item in self._pending if isinstance(item, _Segment)]
            markers = [item for item in self._pending if isinstance(item, _Marker)]
            self._pending = collections.deque([_STOP])
            self._pending_memory_rows = 0
        for marker in markers:
            marker.done.set()
        if kept:
            logger.warning(
                "prediction log stopping with %d rows in %d journal segments; the next start replays them",
                sum(s.rows for s in kept),
                len(kept),
            )

    def _ship(self, segment: _Segment) -> bool:
        """Insert one segment and delete its file; False (and marked down) on a transient error."""
        groups = segment.groups if segment.groups is not None else self._read_segment(segment.path)
        try:
            for chunk in _chunks(groups, self._batch_rows):
                self._insert(chunk, may_exist=segment.may_exist)
        except SQLAlchemyError as exc:
            self._mark_down(exc)
            if not segment.counted_as_waiting:
                segment.counted_as_waiting = True
                self.rows_journaled += _rows(groups)
            # A retry may find some chunks already committed.
            segment.may_exist = True
            return False
        with contextlib.suppress(FileNotFoundError):
            segment.path.unlink()
        return True

    def _read_segment(self, path: Path) -> list[PredictionGroup]:
        """The groups of a journal file; lines that do not parse go to quarantine."""
        groups: list[PredictionGroup] = []
        bad: list[str] = []
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return groups
        for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                groups.append(PredictionGroup.from_json(line))
            except (ValueError, KeyError, TypeError) as exc:
                bad.append(line)
                logger.error(
                    "journal %s line %d is not a prediction record (%s): quarantined", path.name, number, exc
                )
        if bad:
            self._quarantine(path, bad)
        return groups

    def _quarantine(self, source: Path, lines: list[str]) -> None:
        target = self._journal_dir / f"quarantine-{self._host}-{self._nonce}.jsonl"
        self._append_lines(target, [json.dumps({"source": source.name, "line": line}) for line in lines])
        self.lines_quarantined += len(lines)

    def _insert(self, batch: Sequence[PredictionGroup], *, may_exist: bool) -> None:
        rejected_before = self.rows_rejected
        try:
            self._insert_batch(batch, may_exist=may_exist)
        except IntegrityError:
            if may_exist:
                self._insert_one_by_one(batch)
            else:
                # Some rows are there already after all (a segment shipped twice): skip them.
                self._insert(batch, may_exist=True)
                return
        except SQLAlchemyError as exc:
            if is_transient(exc):
                raise
            self._insert_one_by_one(batch)
        self.rows_inserted += _rows(batch) - (self.rows_rejected - rejected_before)

    def _insert_batch(self, batch: Sequence[PredictionGroup], *, may_exist: bool) -> None:
        with self._engine.connect() as connection:
            try:
                with connection.begin():
                    if self._engine.dialect.name == "postgresql":
                        _copy_rows(connection, batch, may_exist=may_exist)
                    else:
                        rows = [dict(record.__dict__) for group in batch for record in group.records()]
                        connection.execute(self._statement, rows)
            except SQLAlchemyError as exc:
                if is_transient(exc):
                    # A session that went read-only (a demoted primary) or timed out must
                    # not be handed back to the pool: the retry gets a new connection.
                    connection.invalidate()
                raise

    def _insert_one_by_one(self, batch: Sequence[PredictionGroup]) -> None:
        # One malformed row must not wedge the journal forever: it goes to a rejects file
        # for a person to look at (and `flood db replay-rejected`), and the rest lands.
        for record in (record for group in batch for record in group.records()):
            try:
                with self._engine.begin() as connection:
                    connection.execute(self._statement, [dict(record.__dict__)])
            except SQLAlchemyError as exc:
                if is_transient(exc):
                    raise
                logger.error("prediction %s rejected by the database: %s", record.request_id, exc)
                rejects = self._journal_dir / f"rejected-{self._host}-{self._nonce}.jsonl"
                self._append_lines(rejects, [record.to_json()])
                self.rows_rejected += 1

    def _mark_down(self, exc: Exception) -> None:
        first = not self._next_retry
        self._next_retry = time.monotonic() + self._retry_s
        self.last_error = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if first:
            logger.error(
                "prediction log database not taking rows; they wait in the journal (%s)", self.last_error
            )

    # -- journal files ----------------------------------------------------------------

    def _take_writer_lock(self) -> None:
        try:
            self._journal_dir.mkdir(parents=True, exist_ok=True)
            handle = self._lock_path.open("ab")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._note_journal_failure(exc)
            return
        self._lock_file = handle

    def _release_writer_lock(self) -> None:
        if self._lock_file is None:
            return
        with contextlib.suppress(OSError):
            self._lock_path.unlink()
        self._lock_file.close()
        self._lock_file = None

    def _adopt_orphans(self) -> None:
        """Adopt the segments of dead writers on this host (crash, kill -9, host loss, an
        earlier incarnation with the same pid), oldest first, ahead of this writer's own."""
        orphans: dict[str, list[Path]] = {}
        for path in self._journal_dir.glob(f"*-{self._host}-*.jsonl"):
            kind, _host, owner, *_ = [*path.stem.split("-"), "", ""]
            if kind in ("journal", "replaying") and owner and owner != self._nonce:
                orphans.setdefault(owner, []).append(path)
        adopted: list[_Segment] = []
        for owner, paths in sorted(orphans.items()):
            if self._owner_alive(owner):
                continue
            for path in sorted(paths, key=lambda p: (p.stat().st_mtime if p.exists() else 0.0, p.name)):
                target = self._journal_dir / f"replaying-{self._host}-{self._nonce}-{uuid.uuid4().hex}.jsonl"
                try:
                    path.rename(target)
                except FileNotFoundError:  # another new writer adopted it first
                    continue
                logger.info("adopted prediction journal %s of a writer that is gone", path.name)
                groups = self._read_segment(target)
                rows = _rows(groups)
                # Large adopted files are read again when shipped rather than held here.
                kept = groups if rows <= _MEMORY_ROWS // 10 else None
                adopted.append(_Segment(path=target, rows=rows, groups=kept, may_exist=True))
            with contextlib.suppress(FileNotFoundError):
                (self._journal_dir / f"writer-{self._host}-{owner}.lock").unlink()
        if not adopted:
            return
        with self._ship_wakeup:
            # Ahead of this writer's own segments; a stop or marker already queued stays after them.
            self._pending.extendleft(reversed(adopted))
            self._pending_memory_rows += sum(s.rows for s in adopted if s.groups is not None)

    def _owner_alive(self, owner: str) -> bool:
        lock = self._journal_dir / f"writer-{self._host}-{owner}.lock"
        try:
            handle = lock.open("rb")
        except FileNotFoundError:
            return False  # no lock: the writer is gone (or predates writer locks)
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False

    def _probe_journal(self) -> None:
        """Find out at start, not during an outage, whether the journal can be written."""
        probe = self._journal_dir / f".probe-{self._host}-{self._nonce}"
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

    def _note_journal_failure(self, exc: OSError) -> None:
        first = self.journal_error is None
        reason = exc.strerror or exc.__class__.__name__
        self.journal_error = f"journal directory {self._journal_dir} cannot be written: {reason}"
        if first:
            logger.error(
                "%s; predictions are committed straight to the database, and refused (%s) "
                "when it cannot take them",
                self.journal_error,
                "durable mode" if self.durability == "durable" else "async mode: held in memory",
            )

    def _hold(self, groups: list[PredictionGroup]) -> None:
        """Async mode only: rows nothing durable took, kept in memory up to a bound and
        offered to the journal again with the next group."""
        dropped = 0
        with self._held_lock:
            self._held.extend(groups)
            self._held_rows += _rows(groups)
            while self._held_rows > _QUEUE_MAX and len(self._held) > 1:
                oldest = self._held.pop(0)
                self._held_rows -= len(oldest)
                dropped += len(oldest)
            self.rows_dropped += dropped
        if dropped:
            logger.error("prediction log dropped %d rows: database and journal both unavailable", dropped)

    def _take_held(self) -> list[PredictionGroup]:
        if not self._held:
            return []
        with self._held_lock:
            held, self._held, self._held_rows = self._held, [], 0
        return held

    @staticmethod
    def _append_lines(path: Path, lines: Iterable[str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))
            handle.flush()
            os.fsync(handle.fileno())


@dataclass(frozen=True)
class RejectedReplay:
    files: int
    replayed: int
    still_rejected: int


def replay_rejected(*, settings: Settings | None = None, engine: Engine | None = None) -> RejectedReplay:
    """Insert the rows of every ``rejected-*.jsonl`` again (after the cause was fixed, e.g. a
    constraint relaxed or a column widened). Rows that still fail go to a new rejects file;
    lines that are not records go to quarantine. Idempotent: rows already there are skipped."""
    settings = settings or get_settings()
    log = PredictionLog(settings=settings, engine=engine)
    files = sorted(log._journal_dir.glob("rejected-*.jsonl"))
    replayed = 0
    before = log.rows_rejected
    try:
        for path in files:
            for chunk in _chunks(log._read_segment(path), log._batch_rows):
                rejected_before = log.rows_rejected
                # Raises on a transient error and the file stays; a file half replayed is
                # replayed again whole, idempotently.
                log._insert(chunk, may_exist=True)
                replayed += _rows(chunk) - (log.rows_rejected - rejected_before)
            path.unlink()
    except SQLAlchemyError as exc:
        raise DependencyUnavailableError(f"the database did not take the rejected rows: {exc}") from exc
    finally:
        if log._owns_engine:
            log._engine.dispose()
    return RejectedReplay(files=len(files), replayed=replayed, still_rejected=log.rows_rejected - before)
