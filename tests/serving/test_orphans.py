"""No orphans: ``kill -9`` of a served Bento's arbiter takes its workers down with it.

A worker that outlived its arbiter kept serving the old Bento and kept the port, so the next
``flood serve`` on that port could not serve it. Here the real CLI serves a Bento, the
arbiter is SIGKILLed (no shutdown code of its own runs), and every worker of both services
must be gone within seconds, after which ``flood serve`` starts cleanly on the same port.
The watchdog's two ways out (graceful, and the hard exit when graceful hangs) are also
tested on plain processes: an "arbiter" that starts a "worker" and is SIGKILLed.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest

from serving import shutdown
from tests.serving.conftest import BuiltHome, free_port, wait_ready
from tests.serving.test_handover import flood_serve, load_until, stop_group

pytestmark = pytest.mark.faults

# serving.services names them; importing it needs a pinned model, as only a Bento has.
API_SERVICE_NAME, MODEL_SERVICE_NAME = "flood_risk", "flood_risk_model"
WORKERS_GONE_WITHIN_S = 10.0


def service_of(process: psutil.Process) -> str | None:
    try:
        argv = process.cmdline()
    except psutil.Error:
        return None
    return next((value for flag, value in itertools.pairwise(argv) if flag == "--service-name"), None)


def find_arbiter(root: psutil.Process) -> psutil.Process:
    """The process in ``root``'s tree whose children are the service workers."""
    for process in [root, *root.children(recursive=True)]:
        if any(service_of(child) for child in process.children()):
            return process
    raise AssertionError(f"no arbiter under pid {root.pid}")


def alive(process: psutil.Process) -> bool:
    # An orphan's new parent may never reap it: a zombie has exited and holds no socket.
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.serve
@pytest.mark.slow
def test_workers_exit_when_their_arbiter_is_killed(
    built_home: BuiltHome, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two versions, so an answer says which server gave it: orphans of the first would
    # still answer with theirs.
    first_version, second_version = max(built_home.bentos), min(built_home.bentos)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = flood_serve(built_home, built_home.bentos[first_version].tag, "--port", str(port), log=first_log)
    second = None
    workers: list[psutil.Process] = []
    try:
        wait_ready(url, first, first_log)
        arbiter = find_arbiter(psutil.Process(first.pid))
        # `flood serve` execs into the server, whose process is the arbiter itself.
        assert arbiter.pid == first.pid
        kinds = {child: service_of(child) for child in arbiter.children() if service_of(child)}
        workers.extend(kinds)
        assert set(kinds.values()) == {API_SERVICE_NAME, MODEL_SERVICE_NAME}

        async def kill_under_load() -> tuple[Counter[int | str], float]:
            done = asyncio.Event()
            load = asyncio.create_task(load_until(url, built_home.auth, keepalive=False, done=done))
            await asyncio.sleep(1)
            os.kill(arbiter.pid, signal.SIGKILL)
            killed = time.monotonic()
            while any(alive(w) for w in workers) and time.monotonic() - killed < WORKERS_GONE_WITHIN_S:
                await asyncio.sleep(0.05)
            gone_after = time.monotonic() - killed
            done.set()
            statuses, _ = await load
            return statuses, gone_after

        statuses, gone_after = asyncio.run(kill_under_load())
        first.wait(timeout=10)
        left = [(w.pid, kinds[w]) for w in workers if alive(w)]
        with capsys.disabled():
            print(
                f"\n[orphans] arbiter kill -9 under load: {len(workers)} workers "
                f"({Counter(kinds.values())}), workers gone after {gone_after:.2f} s, left {left}; "
                f"requests {dict(statuses)}"
            )
        assert not left, f"still running {gone_after:.1f} s after the arbiter died: {left}"
        # No answer went wrong: what was accepted was answered (the model outlived the API),
        # the rest could not connect.
        assert statuses[200] > 0 and not [s for s in statuses if isinstance(s, int) and s != 200], statuses
        # They stopped the ordinary way, drained and flushed, not by the hard exit. Which of
        # the parent-death signal and the watchdog got there first varies, and a worker the
        # signal stopped may exit before its watchdog thread logs, so the watchdog's line is
        # not counted: every worker's own cleanup is.
        log = first_log.read_text()
        assert log.count("Service instance cleanup finalized") == len(workers), log[-3000:]
        api_workers = sum(kind == API_SERVICE_NAME for kind in kinds.values())
        assert log.count("Completed cleanup hook: close_operations") == api_workers, log[-3000:]
        assert "after its arbiter died; exiting" not in log

        started = time.monotonic()
        second = flood_serve(
            built_home, built_home.bentos[second_version].tag, "--port", str(port), log=second_log
        )
        wait_ready(url, second, second_log)
        ready_after = time.monotonic() - started
        for _ in range(5):  # fresh connections, each free to land on any socket on the port
            health = httpx.get(f"{url}/health", timeout=5)
            assert health.status_code == 200, health.text
            assert health.json()["status"] == "healthy"
            assert health.headers["X-Model-Version"] == str(second_version)
        with capsys.disabled():
            print(
                f"[orphans] the next `flood serve` on port {port} answered /health after {ready_after:.1f} s"
            )
    finally:
        for process in (first, second):
            if process is not None:
                stop_group(process.pid)
        # Circus gives each worker a process group of its own: orphans of a failed run are
        # out of the arbiter's reach.
        for worker in workers:
            if alive(worker):
                worker.kill()


# A worker: SIGTERM is its graceful shutdown (here: note it and exit), unless told to hang.
WORKER = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    from serving import shutdown

    marker, hang = Path(sys.argv[1]), sys.argv[2] == "hang"
    shutdown._HARD_EXIT_MARGIN_S = 0.0

    def stop(signum, frame):
        marker.write_text("sigterm")
        if not hang:
            sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    shutdown.exit_with_arbiter(graceful_s=1.0)
    print("watching", flush=True)
    time.sleep(120)
""")
# An arbiter: stamps itself as serving.handover does, starts the worker, waits to be killed.
ARBITER = textwrap.dedent("""
    import os, subprocess, sys, time
    from serving.shutdown import ARBITER_PID_ENV

    os.environ[ARBITER_PID_ENV] = str(os.getpid())
    worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], stdout=subprocess.PIPE)
    assert worker.stdout is not None and worker.stdout.readline() == b"watching\\n"
    print(worker.pid, flush=True)
    time.sleep(120)
""")


def orphan_after_kill(tmp_path: Path, mode: str) -> tuple[psutil.Process, float, Path]:
    """Kill -9 the arbiter; the worker, how long it outlived the arbiter, its marker."""
    marker = tmp_path / "marker"
    stderr = (tmp_path / "worker.err").open("wb")
    arbiter = subprocess.Popen(
        [sys.executable, "-c", ARBITER, WORKER, str(marker), mode],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        stderr=stderr,
    )
    assert arbiter.stdout is not None
    worker = psutil.Process(int(arbiter.stdout.readline()))
    try:
        arbiter.kill()
        arbiter.wait(timeout=10)
        killed = time.monotonic()
        while alive(worker) and time.monotonic() - killed < WORKERS_GONE_WITHIN_S:
            time.sleep(0.02)
        return worker, time.monotonic() - killed, marker
    finally:
        stderr.close()
        if alive(worker):
            worker.kill()


def test_an_orphan_shuts_down_gracefully(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    worker, gone_after, marker = orphan_after_kill(tmp_path, "exit")
    with capsys.disabled():
        print(f"\n[orphans] plain worker: gone after {gone_after:.2f} s (graceful)")
    assert not alive(worker) and gone_after < 2
    assert marker.read_text() == "sigterm"


def test_an_orphan_whose_shutdown_hangs_exits_anyway(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    worker, gone_after, marker = orphan_after_kill(tmp_path, "hang")
    with capsys.disabled():
        print(f"\n[orphans] worker ignoring SIGTERM: gone after {gone_after:.2f} s (hard exit after 1 s)")
    assert not alive(worker) and 1 <= gone_after < 4
    assert marker.read_text() == "sigterm"
    assert "after its arbiter died; exiting" in (tmp_path / "worker.err").read_text()


def test_the_arbiter_is_known_from_the_stamp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(shutdown.ARBITER_PID_ENV, raising=False)
    assert shutdown._arbiter_pid() == os.getppid()  # plain `bentoml serve`: the parent
    monkeypatch.setenv(shutdown.ARBITER_PID_ENV, str(os.getppid()))
    assert shutdown._arbiter_pid() == os.getppid()
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    monkeypatch.setenv(shutdown.ARBITER_PID_ENV, str(dead.pid))
    assert shutdown._arbiter_pid() is None  # died before the worker looked
    monkeypatch.setenv(shutdown.ARBITER_PID_ENV, str(os.getpid()))
    assert shutdown._arbiter_pid() == os.getppid()  # a stamp from elsewhere: the parent
