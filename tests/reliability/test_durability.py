"""Durable before answered, against a served Bento: no answered prediction goes unlogged
through kill -9 of a worker, of every process, a host lost right after a burst, a read-only
database, or a client repeating its X-Request-ID (issue 15's table, one test per row).

One deployment with a PostgreSQL cluster and a Redis of its own and two API workers; the
server is restarted on the same FLOOD_HOME (and so the same journal directory) after the
tests that kill it. Each test records its figure for the fault table (see conftest).
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from pydantic import SecretStr
from sqlalchemy import create_engine, func, select, text

from bundle.bentos import find_bento
from core.settings import Settings
from ops.database import dispose_engines
from ops.keys import ApiKeyStore
from ops.predictionlog import PredictionGroup
from ops.tables import PredictionLogRow
from tests.reliability.conftest import Figure, record_figure
from tests.reliability.load import DAY, BackgroundLoad, Outcome, statuses
from tests.reliability.services import PrivatePostgres, PrivateRedis
from tests.reliability.test_faults import MODEL_SERVICE, rows_lost
from tests.serving.conftest import TEST_TIERS, BuiltHome, Server, start_server, stop_server

pytestmark = [pytest.mark.faults, pytest.mark.serve, pytest.mark.slow]

BATCH_ROWS = 50


@dataclass
class Durable:
    built: BuiltHome
    home: Settings
    postgres: PrivatePostgres
    env: dict[str, str]
    root: Path
    key: str
    server: Server | None = None
    starts: int = field(default=0)

    def start(self) -> Server:
        bento = find_bento(self.built.bentos[max(self.built.bentos)].tag, settings=self.home)
        self.starts += 1
        self.server = start_server(
            bento, settings=self.home, log=self.root / f"serve-{self.starts}.log", env=self.env
        )
        return self.server

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    @property
    def database_url(self) -> str:
        return self.home.effective_database_url

    def load(self, *, concurrency: int, batch: bool = False, pause_s: float = 0.0) -> BackgroundLoad:
        body = {"observations": [DAY] * BATCH_ROWS} if batch else dict(DAY)
        path = "/api/v1/predict/batch" if batch else "/api/v1/predict"
        return BackgroundLoad(
            self.url, {"X-API-Key": self.key}, concurrency=concurrency, pause_s=pause_s, body=body, path=path
        ).start()

    def api_workers(self) -> list[psutil.Process]:
        assert self.server is not None
        workers = []
        for child in psutil.Process(self.server.process.pid).children():
            with contextlib.suppress(psutil.Error):
                if MODEL_SERVICE not in child.cmdline():
                    workers.append(child)
        return workers

    def kill_everything(self) -> int:
        """SIGKILL the arbiter and every worker at once: no shutdown code runs anywhere."""
        assert self.server is not None
        arbiter = psutil.Process(self.server.process.pid)
        processes = [arbiter, *arbiter.children(recursive=True)]
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGKILL)
        self.server.process.wait(timeout=10)
        psutil.wait_procs(processes, timeout=10)
        self.server = None
        return len(processes)


@pytest.fixture(scope="module")
def durable(built_home: BuiltHome, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Durable]:
    postgres = PrivatePostgres()
    redis = PrivateRedis()
    root = tmp_path_factory.mktemp("durable-home")
    deployment: Durable | None = None
    try:
        postgres.init()
        postgres.start()
        postgres.create_database("flood")
        redis.start()
        shutil.copytree(built_home.settings.bentoml_home, root / "bentoml", symlinks=True)
        secret = secrets.token_urlsafe(48)
        home = Settings(
            flood_home=root,
            database_url=postgres.url("flood"),
            secret_key=SecretStr(secret),
            rate_limit_tiers=TEST_TIERS,
        )
        # An admin key: /health/detailed shows it the prediction log's errors.
        key = ApiKeyStore(settings=home, cache_seconds=0).create_key("durable", "admin").raw_key
        env = {
            "SECRET_KEY": secret,
            "DATABASE_URL": home.effective_database_url,
            "REDIS_URL": redis.url,
            "RATE_LIMIT_POLICY": "fail-open",
            "SERVING_API_WORKERS": "2",
        }
        deployment = Durable(built_home, home, postgres, env, root, key)
        deployment.start()
        yield deployment
    finally:
        if deployment is not None and deployment.server is not None:
            stop_server(deployment.server.process)
        dispose_engines()
        redis.stop()
        postgres.destroy()


def _errors(outcomes: list[Outcome]) -> int:
    return sum(n for status, n in statuses(outcomes).items() if status != 200)


def _journal_files(d: Durable) -> int:
    return len(list((d.root / "journal").glob("*.jsonl")))


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch50"])
def test_kill_9_of_one_api_worker_loses_no_answered_row(durable: Durable, batch: bool) -> None:
    d = durable
    before = {w.pid for w in d.api_workers()}
    load = d.load(concurrency=16, batch=batch)
    time.sleep(4)
    victim = d.api_workers()[0]
    victim.kill()
    killed = time.monotonic()
    time.sleep(4)
    outcomes = load.stop()
    rows = BATCH_ROWS if batch else 1
    lost, waited = rows_lost(d.database_url, outcomes, timeout_s=60, rows_per_request=rows)
    after = {w.pid for w in d.api_workers()}
    kind = f"{BATCH_ROWS}-row batches" if batch else "single rows"
    record_figure(
        Figure(
            f"kill -9 of one API worker at c=16, {kind}",
            len(outcomes),
            _errors(outcomes),
            lost,
            waited,
            f"{len(outcomes) - _errors(outcomes)} answered ({rows} rows each); worker restarted: "
            f"{bool(after - before)}; killed {time.monotonic() - killed:.0f} s before the check",
        )
    )
    assert lost == 0
    # Requests on the killed worker's connections fail (the client sees a reset), but
    # none of them was answered, so none is missing from the log.
    assert statuses(outcomes)[200] > 0


@pytest.mark.parametrize(
    ("label", "load_s", "concurrency"),
    [
        ("every server process SIGKILLed under load, then restarted", 5.0, 8),
        ("host gone 0 s after a 2 s burst (all SIGKILLed), then restarted", 2.0, 16),
    ],
    ids=["all-processes", "host-gone"],
)
def test_everything_sigkilled_then_restarted_replays_every_answered_row(
    durable: Durable, label: str, load_s: float, concurrency: int
) -> None:
    d = durable
    load = d.load(concurrency=concurrency)
    time.sleep(load_s)
    killed = d.kill_everything()  # while requests are in flight: no drain, no flush, no atexit
    outcomes = load.stop()
    left = _journal_files(d)
    restarted = time.monotonic()
    d.start()  # the next server on this host adopts the dead writers' journals
    lost, waited = rows_lost(d.database_url, outcomes, timeout_s=60)
    record_figure(
        Figure(
            label,
            len(outcomes),
            _errors(outcomes),
            lost,
            time.monotonic() - restarted,
            f"{killed} processes killed, {left} journal files left, all rows in {waited:.1f} s after start",
        )
    )
    assert lost == 0
    assert (
        httpx.post(f"{d.url}/api/v1/predict", json=DAY, headers={"X-API-Key": d.key}, timeout=30).status_code
        == 200
    )


def _set_read_only(d: Durable, on: bool) -> None:
    # ALTER SYSTEM + reload reaches sessions already open, as a primary demoted to a
    # standby does: every write then fails with SQLSTATE 25006.
    admin = create_engine(d.postgres.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"ALTER SYSTEM SET default_transaction_read_only = {'on' if on else 'off'}"))
        connection.execute(text("SELECT pg_reload_conf()"))
    admin.dispose()


def test_a_read_only_database_for_5_s_loses_nothing(durable: Durable) -> None:
    d = durable
    load = d.load(concurrency=4, pause_s=0.01)
    time.sleep(2)
    _set_read_only(d, True)
    try:
        time.sleep(5)
        detailed = httpx.get(f"{d.url}/health/detailed", headers={"X-API-Key": d.key}, timeout=10)
        during = detailed.json()["operations"]["prediction_log"]
    finally:
        _set_read_only(d, False)
    restored = time.monotonic()
    time.sleep(2)
    outcomes = load.stop()
    lost, _ = rows_lost(d.database_url, outcomes, timeout_s=60)
    recovery = time.monotonic() - restored
    rejected = list((d.root / "journal").glob("rejected-*.jsonl"))
    record_figure(
        Figure(
            "database read-only for 5 s (default_transaction_read_only=on)",
            len(outcomes),
            _errors(outcomes),
            lost,
            recovery,
            f"rejected files: {len(rejected)}; health during: {during['status']} ({during['last_error']})",
        )
    )
    assert during["status"] == "degraded" and "ReadOnly" in str(during["last_error"]), during
    assert rejected == []
    assert _errors(outcomes) == 0
    assert lost == 0


def test_a_repeated_x_request_id_cannot_keep_predictions_out_of_the_log(durable: Durable) -> None:
    d = durable
    repeated = f"same-{secrets.token_hex(4)}"
    answers = [
        httpx.post(
            f"{d.url}/api/v1/predict",
            json={**DAY, "rainfall": i},
            headers={"X-API-Key": d.key, "X-Request-ID": repeated},
            timeout=30,
        )
        for i in range(51)
    ]
    assert all(a.status_code == 200 for a in answers)
    assert {a.json()["client_request_id"] for a in answers} == {repeated}
    server_ids = {a.json()["request_id"] for a in answers}
    engine = create_engine(d.database_url)
    deadline = time.monotonic() + 30
    count = 0
    while time.monotonic() < deadline:
        with engine.connect() as connection:
            count = connection.execute(
                select(func.count())
                .select_from(PredictionLogRow)
                .where(PredictionLogRow.client_request_id == repeated)
            ).scalar_one()
        if count >= 51:
            break
        time.sleep(0.2)
    engine.dispose()
    record_figure(
        Figure(
            "the same X-Request-ID sent 51 times by one client",
            51,
            0,
            51 - count,
            None,
            f"{len(server_ids)} distinct server ids, {count} rows",
        )
    )
    assert len(server_ids) == 51
    assert count == 51


def test_answered_is_durable_with_no_shutdown_code_at_all(durable: Durable) -> None:
    """The strictest form: answer, then SIGKILL everything at once with nothing in flight;
    the rows of the answers just given are on disk (the next start ships them)."""
    d = durable
    answered = []
    for i in range(20):
        answer = httpx.post(
            f"{d.url}/api/v1/predict",
            json={**DAY, "rainfall": i},
            headers={"X-API-Key": d.key, "X-Request-ID": f"last-{i}-{secrets.token_hex(3)}"},
            timeout=30,
        )
        assert answer.status_code == 200
        answered.append(answer.json()["request_id"])
    d.kill_everything()
    on_disk = set()
    for path in (d.root / "journal").glob("journal-*.jsonl"):
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        on_disk |= {row_id for line in lines for row_id in PredictionGroup.from_json(line).row_ids}
    engine = create_engine(d.database_url)
    with engine.connect() as connection:
        in_db = set(
            connection.scalars(
                select(PredictionLogRow.request_id).where(PredictionLogRow.request_id.in_(answered))
            )
        )
    engine.dispose()
    missing = set(answered) - on_disk - in_db
    d.start()
    record_figure(
        Figure(
            "answered, then every process SIGKILLed (nothing in flight)",
            20,
            0,
            len(missing),
            None,
            f"{len(in_db)} already in the database, {len(set(answered) & on_disk)} only in the journal",
        )
    )
    assert missing == set()
