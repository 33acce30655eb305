"""The prediction journal on a full disk: a clear error, degraded health, no crash loop;
predictions are committed straight to the database, and while the database is cut too they
are refused (503) rather than answered unlogged. Nothing answered is lost."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from pydantic import SecretStr
from sqlalchemy.engine import make_url

from bundle.bentos import find_bento
from core.settings import Settings
from ops.database import dispose_engines
from ops.keys import ApiKeyStore
from ops.migrations import upgrade_database
from tests.conftest import fresh_postgres_database
from tests.ops.proxy import FaultyProxy
from tests.reliability.conftest import Figure, record_figure
from tests.reliability.load import BackgroundLoad, statuses
from tests.reliability.test_faults import rows_lost, wait_until
from tests.serving.conftest import TEST_TIERS, BuiltHome, Server, start_server, stop_server
from tests.serving.test_ops_http import with_port

pytestmark = [pytest.mark.faults, pytest.mark.serve, pytest.mark.slow, pytest.mark.postgres]

DB_CUT_S = 10


@dataclass(frozen=True)
class FullDisk:
    server: Server
    database_url: str  # direct, for checking the log
    proxy: FaultyProxy  # the server's way to the database
    journal: Path
    filler: Path | None  # None when the journal is a regular file instead of a full disk
    key: str

    def detailed(self) -> dict[str, Any]:
        # An admin key: the journal's errors (paths, reasons) are not shown to the public.
        answer = httpx.get(f"{self.server.url}/health/detailed", headers={"X-API-Key": self.key}, timeout=10)
        return dict(answer.json())


def fill_journal_disk(journal: Path) -> Path | None:
    """A 64 KiB tmpfs mounted at ``journal`` and filled; or, where mounting is not allowed,
    a regular file in the journal directory's place. The filler file, or None."""
    journal.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(journal)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        journal.rmdir()
        journal.write_text("not a directory\n")
        return None
    filler = journal / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


@pytest.fixture(scope="module")
def full_disk(built_home: BuiltHome, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullDisk]:
    root = tmp_path_factory.mktemp("journal-home")
    shutil.copytree(built_home.settings.bentoml_home, root / "bentoml", symlinks=True)
    journal = root / "journal"
    filler: Path | None = None
    try:
        filler = fill_journal_disk(journal)
        with fresh_postgres_database("flood_journal") as database_url:
            upgrade_database(database_url)
            proxy = FaultyProxy("127.0.0.1", make_url(database_url).port or 5432)
            proxy.start()
            secret = secrets.token_urlsafe(48)
            home = Settings(
                flood_home=root,
                database_url=database_url,
                secret_key=SecretStr(secret),
                rate_limit_tiers=TEST_TIERS,
            )
            key = ApiKeyStore(settings=home, cache_seconds=0).create_key("journal", "admin").raw_key
            bento = find_bento(built_home.bentos[max(built_home.bentos)].tag, settings=home)
            # One API worker: the test reads the rows held in memory from /health/detailed,
            # which reports the state of whichever worker answers.
            env = {
                "SECRET_KEY": secret,
                "DATABASE_URL": with_port(database_url, proxy.port),
                "SERVING_API_WORKERS": "1",
            }
            server = start_server(bento, settings=home, log=root / "serve.log", env=env)
            try:
                yield FullDisk(server, database_url, proxy, journal, filler, key)
            finally:
                stop_server(server.process)
                proxy.stop()
                dispose_engines()
    finally:
        if journal.is_mount():
            subprocess.run(["umount", str(journal)], check=False)


def api_workers(server: Server) -> list[int]:
    pids = []
    for child in psutil.Process(server.process.pid).children():
        with contextlib.suppress(psutil.Error):
            if "flood_risk_model" not in child.cmdline():
                pids.append(child.pid)
    return pids


def test_a_full_journal_disk_is_reported_and_survived(full_disk: FullDisk) -> None:
    d = full_disk
    workers = api_workers(d.server)
    detailed = d.detailed()
    log_state = detailed["operations"]["prediction_log"]
    assert detailed["status"] == "degraded" and log_state["status"] == "degraded", detailed
    reason = "No space left on device" if d.filler is not None else "Not a directory"
    assert str(d.journal) in log_state["journal_error"] and reason in log_state["journal_error"]
    assert httpx.get(f"{d.server.url}/health/ready", timeout=10).status_code == 200
    assert "cannot be written" in d.server.log.read_text()

    load = BackgroundLoad(d.server.url, {"X-API-Key": d.key}, concurrency=2, pause_s=0.05).start()
    time.sleep(2)
    d.proxy.stop()  # now nothing durable can take the rows: requests must be refused
    cut = time.monotonic()
    time.sleep(DB_CUT_S)
    during = d.detailed()["operations"]["prediction_log"]
    d.proxy.start()
    restored = time.monotonic()
    time.sleep(3)
    outcomes = load.stop()
    lost, _ = rows_lost(d.database_url, outcomes, timeout_s=60)
    recovery = time.monotonic() - restored
    counted = statuses(outcomes)
    # Answered within the cut, after the key cache and pool noticed it; a request still
    # waiting for a durable place when the database came back is rightly answered 200.
    in_cut = [o for o in outcomes if cut + 5 <= o.started and o.started + o.latency_s < restored]
    after = [o for o in outcomes if o.started >= restored + 2]
    restarts = len(set(api_workers(d.server)) - set(workers))
    record_figure(
        Figure(
            f"journal disk full, then PostgreSQL cut {DB_CUT_S} s",
            len(outcomes),
            sum(n for status, n in counted.items() if status != 200),
            lost,
            recovery,
            f"statuses {dict(counted)}; {during['rows_refused']} rows refused (503) during the cut; "
            f"API worker restarts: {restarts}",
        )
    )
    assert lost == 0
    assert set(counted) <= {200, 503}, counted
    assert in_cut and all(o.status == 503 for o in in_cut), statuses(in_cut)
    assert after and all(o.status == 200 for o in after), statuses(after)
    assert during["rows_refused"] > 0 and during["rows_held"] == 0, during
    assert restarts == 0, "the API worker was restarted"

    if d.filler is not None:
        d.filler.unlink()
        wait_until(
            lambda: d.detailed()["operations"]["prediction_log"]["journal_error"] is None,
            timeout_s=10,
            what="the journal error cleared once space is free",
        )
