"""Replacing a served Bento on one machine without refusing a connection.

``flood serve`` runs BentoML's server through :func:`main`, which makes three changes to
how its process manager (circus) holds the public socket:

1. The socket is bound with ``SO_REUSEPORT``, so a second server can bind the same port
   while the first still serves.
2. Right after ``listen`` a classic BPF program is attached to the port's reuseport group
   that sends every new connection to the group's first socket: the server that was there
   first keeps all traffic while a newcomer starts, instead of the kernel hashing half the
   connections to a socket whose workers are not accepting yet.
3. When the server is told to stop, it closes its own copy of the socket at once (its
   workers close theirs as they begin draining), so the next server becomes the group's
   first socket and receives every new connection while in-flight requests finish here.
   With ``net.ipv4.tcp_migrate_req=1`` connections still in this socket's accept queue
   move to the next server instead of being reset; ``flood serve --replace`` warns when it
   is off.

Why this and not a proxy in front: no extra hop on every request, and nothing to supervise
besides the Bento itself. The price is that it needs Linux (>= 5.14 for request migration).

The handover itself (:func:`finish_handover`, run by ``flood serve --replace``):

1. wait until every API worker of the new server has written ``<handover dir>/<pid>.ready``
   (each does once the model service answers);
2. point the group's program at the new socket (second in the group), through a short-lived
   socket of our own that joins the group only to attach it: new connections go there now;
3. mark the old server draining: its answers carry ``Connection: close`` for
   ``DRAIN_GAP_S``, so keep-alive clients leave after a response instead of racing an idle
   close, and it still serves whatever it had accepted;
4. SIGTERM the old server (its ordinary graceful shutdown), wait for it to exit, and point
   the program back at the first socket, ready for the next replacement.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.processes import pid_alive
from serving.shutdown import ARBITER_PID_ENV

logger = logging.getLogger(__name__)

HANDOVER_DIR_ENV = "FLOOD_HANDOVER_DIR"
DRAINING_FILE = "draining"
DRAIN_GAP_S = 2.0
_DRAIN_CHECK_S = 0.1
API_SOCKET_NAME = "_bento_api_server"  # _bentoml_impl.server.serving.API_SERVER_NAME
SO_ATTACH_REUSEPORT_CBPF = 51  # linux/asm-generic/socket.h; not exported by Python
_BPF_RET_K = 0x06
MIGRATE_SYSCTL = Path("/proc/sys/net/ipv4/tcp_migrate_req")


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def steer(sock: socket.socket, index: int) -> None:
    """Attach ``return index`` to the reuseport group of ``sock``: new connections go to its
    index-th listening socket (in joining order), or by hash when there is no such socket."""
    program = (_SockFilter * 1)(_SockFilter(_BPF_RET_K, 0, 0, index))
    fprog = _SockFprog(1, ctypes.cast(program, ctypes.POINTER(_SockFilter)))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))


def steer_group(host: str, port: int, index: int) -> None:
    """Attach ``return index`` to the group listening on host:port, from outside it.

    A socket of ours joins the group (last, so it moves no one's index), attaches the
    program and leaves. While it is there the current program keeps traffic off it; what
    lands on it anyway migrates to the group when it closes (``tcp_migrate_req``).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        probe.bind((host, port))
        probe.listen(1)
        steer(probe, index)


def migration_enabled() -> bool:
    try:
        return MIGRATE_SYSCTL.read_text().strip() == "1"
    except OSError:
        return False


def _patch_circus() -> None:
    from circus.sockets import CircusSocket

    from serving import bentoml_internals

    Arbiter = bentoml_internals.resolve("arbiter")  # noqa: N806

    original_init: Callable[..., None] = CircusSocket.__init__
    original_listen: Callable[[CircusSocket], None] = CircusSocket.bind_and_listen
    original_stop: Callable[[Any], Any] = Arbiter.stop

    def init(self: CircusSocket, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        if self.name == API_SOCKET_NAME:
            # Set here, not through circus's own so_reuseport flag: with that flag circus
            # leaves the socket unbound for each worker to bind, and uvicorn then listens
            # on a random port.
            self.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)

    def bind_and_listen(self: CircusSocket) -> None:
        original_listen(self)
        if self.name == API_SOCKET_NAME:
            steer(self, 0)  # the server already here keeps the traffic while this one starts

    def stop(self: Any) -> Any:
        api_socket = self.sockets.get(API_SOCKET_NAME)
        if api_socket is not None:
            # Leave the reuseport group now, not after draining: the next server takes the
            # new connections while this one finishes its requests.
            api_socket.close()
        return original_stop(self)

    CircusSocket.__init__ = init
    CircusSocket.bind_and_listen = bind_and_listen
    Arbiter.stop = stop


def main() -> None:
    """``python -m serving.handover serve BENTO ...``: ``bentoml`` with the changes above."""
    if sys.argv[1:2] == ["finish"]:  # the detached helper of `flood serve --replace`
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s handover: %(message)s")
        old, new, ready_dir, old_dir, host, port, workers, timeout = sys.argv[2:10]
        finish_handover(
            Handover(
                old_pid=int(old),
                new_pid=int(new),
                ready_dir=Path(ready_dir),
                old_dir=Path(old_dir),
                host=host,
                port=int(port),
                api_workers=int(workers),
                timeout_s=float(timeout),
            )
        )
        return
    _patch_circus()
    # This process becomes the arbiter; its workers watch it and stop when it dies.
    os.environ[ARBITER_PID_ENV] = str(os.getpid())
    from bentoml_cli.cli import cli

    sys.argv = ["bentoml", *sys.argv[1:]]
    cli()


# -- readiness markers --------------------------------------------------------------------


def handover_dir(run_dir: Path, arbiter_pid: int) -> Path:
    return run_dir / f"serve-{arbiter_pid}"


def prune_handover_dirs(run_dir: Path) -> None:
    """Remove the handover dirs of servers that are gone."""
    for directory in run_dir.glob("serve-*"):
        pid = directory.name.removeprefix("serve-")
        if directory.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(directory, ignore_errors=True)


class DrainFlag:
    """Whether this server is being replaced (cheap to ask on every response)."""

    def __init__(self) -> None:
        directory = os.environ.get(HANDOVER_DIR_ENV)
        self._path = Path(directory) / DRAINING_FILE if directory else None
        self._checked_at = 0.0
        self._draining = False

    def draining(self) -> bool:
        if self._path is None or self._draining:
            return self._draining
        now = time.monotonic()
        if now - self._checked_at >= _DRAIN_CHECK_S:
            self._checked_at = now
            self._draining = self._path.exists()
        return self._draining


def mark_worker_ready() -> None:
    """Called by each API worker once it can serve (the model service answered)."""
    directory = os.environ.get(HANDOVER_DIR_ENV)
    if not directory:
        return
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{os.getpid()}.ready").touch()


@dataclass(frozen=True)
class Handover:
    """The old server to stop once the new one (this process after ``exec``) is ready."""

    old_pid: int
    new_pid: int
    ready_dir: Path
    old_dir: Path  # the old server's handover dir, where its drain flag goes
    host: str
    port: int
    api_workers: int
    timeout_s: float


def serving_pid(pidfile: Path) -> int | None:
    """The pid in ``pidfile`` if it is still a server started by ``flood serve``."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    # A recycled pid is some other program: only a live handover server counts.
    return pid if b"serving.handover" in cmdline else None


def start_detached(argv: list[str]) -> None:
    """Run ``argv`` in a grandchild, so it outlives this process's ``exec`` unreaped by it."""
    child = os.fork()
    if child == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv(argv[0], argv)
        os._exit(0)
    os.waitpid(child, 0)


def finish_handover(handover: Handover) -> bool:
    """Wait for the new server's API workers, then stop the old server gracefully.

    Runs in a detached child of ``flood serve --replace``. Returns False (the old server
    keeps serving) when the new one dies or is not ready within ``timeout_s``.
    """
    deadline = time.monotonic() + handover.timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(handover.new_pid):
            logger.error(
                "the new server (pid %d) exited; pid %d keeps serving", handover.new_pid, handover.old_pid
            )
            return False
        ready = list(handover.ready_dir.glob("*.ready")) if handover.ready_dir.is_dir() else []
        if len(ready) >= handover.api_workers:
            break
        time.sleep(0.2)
    else:
        logger.error(
            "the new server (pid %d) was not ready within %.0f s; pid %d keeps serving",
            handover.new_pid,
            handover.timeout_s,
            handover.old_pid,
        )
        return False
    steer_group(handover.host, handover.port, 1)
    logger.info("new server ready and taking new connections; draining pid %d", handover.old_pid)
    handover.old_dir.mkdir(parents=True, exist_ok=True)
    (handover.old_dir / DRAINING_FILE).touch()
    time.sleep(DRAIN_GAP_S)
    if pid_alive(handover.old_pid):
        os.kill(handover.old_pid, signal.SIGTERM)
    stop_deadline = time.monotonic() + 120
    while pid_alive(handover.old_pid) and time.monotonic() < stop_deadline:
        time.sleep(0.2)
    # Alone in the group, the new server is its first socket: back to "the first one keeps
    # the traffic", so the next replacement starts the same way this one did.
    steer_group(handover.host, handover.port, 0)
    logger.info("pid %d stopped; pid %d serves alone", handover.old_pid, handover.new_pid)
    return True


if __name__ == "__main__":
    main()
