"""Private Redis and PostgreSQL servers a test may kill, stop and start.

The machine's shared servers (Redis :6379, PostgreSQL :5432) serve other test sessions,
so faults are injected into servers of our own on free loopback ports.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import IN_CI
from tests.serving.conftest import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"


def _unavailable(message: str) -> None:
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


class PrivateRedis:
    """``redis-server`` without persistence on a free port; ``kill()`` is ``kill -9``."""

    def __init__(self) -> None:
        if shutil.which("redis-server") is None:
            _unavailable("redis-server is not on PATH")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--loglevel", "warning"]
        self._process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=10)
            self._process = None

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None

    def keys(self, pattern: str) -> list[bytes]:
        client = redis.Redis(port=self.port, socket_timeout=1)
        try:
            return list(client.scan_iter(match=pattern))
        finally:
            client.close()


class PrivatePostgres:
    """A PostgreSQL 15 cluster of its own (trust auth, loopback, fsync off), run as the
    ``postgres`` OS user, which PostgreSQL requires when the tests run as root."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").is_file():
            _unavailable(f"PostgreSQL server binaries not found in {PG_BIN}")
        try:
            self._user = pwd.getpwnam(PG_USER)
        except KeyError:
            _unavailable(f"no {PG_USER} OS user to run a private PostgreSQL")
        self.port = free_port()
        # Not under pytest's tmp_path: its parents are private to root.
        self.root = Path(tempfile.mkdtemp(prefix="flood-private-pg-"))
        os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"

    def _run(self, *argv: str) -> None:
        prefix = ["runuser", "-u", PG_USER, "--"] if os.geteuid() == 0 else []
        done = subprocess.run([*prefix, *argv], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stderr.strip()[-1500:]}")

    def init(self) -> None:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", PG_USER, "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-o", options, "start"
        )

    def stop(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def create_database(self, name: str) -> str:
        """A new database at the ops schema's head revision; its URL."""
        from sqlalchemy import create_engine, text

        from ops.migrations import upgrade_database

        admin = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        upgrade_database(self.url(name))
        return self.url(name)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
