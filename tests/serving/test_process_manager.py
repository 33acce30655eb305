"""BentoML's process manager takes commands from the server's own user only (security finding 6).

circus, which starts and watches BentoML's workers, listened for commands on two ZMQ TCP
ports on 127.0.0.1 with no authentication. Any local user could connect and ask it to
start a process, which then ran as the server's user (``id`` ran as root). Its endpoints
are now ipc sockets in a directory only the server's user can enter
(``serving.hardening.run_arbiter_privately``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest

from tests.conftest import IN_CI
from tests.serving.conftest import Server

pytestmark = [pytest.mark.security, pytest.mark.serve, pytest.mark.slow]

NOBODY = "65534"
# Any Python will do for the other user's connection attempt, but the project's venv
# interpreter may sit under a home directory that user cannot enter.
SYSTEM_PYTHON = "/usr/bin/python3"
# A connection to a unix socket path, or to a TCP port on 127.0.0.1 when given a number.
CONNECT = """import socket, sys
where = sys.argv[1]
if where.isdigit():
    socket.create_connection(("127.0.0.1", int(where)), timeout=5)
else:
    socket.socket(socket.AF_UNIX).connect(where)
"""


def arbiter_endpoints(server: Server) -> dict[str, Path]:
    arbiter = psutil.Process(server.process.pid)
    paths = [Path(c.laddr) for c in arbiter.net_connections(kind="unix") if c.laddr]
    return {path.name: path for path in paths if path.parent.name.startswith("flood-arbiter-")}


def command_endpoints(server: Server) -> list[str]:
    """Where the arbiter listens, but for the HTTP port: TCP ports and its ipc sockets."""
    arbiter = psutil.Process(server.process.pid)
    http_port = int(server.url.rsplit(":", 1)[1])
    ports = {c.laddr.port for c in arbiter.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
    sockets = [str(path) for path in arbiter_endpoints(server).values()]
    return [str(port) for port in sorted(ports - {http_port})] + sockets


def test_the_process_manager_listens_on_no_tcp_port(server: Server) -> None:
    arbiter = psutil.Process(server.process.pid)
    http_port = int(server.url.rsplit(":", 1)[1])
    listening = {c.laddr.port for c in arbiter.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
    # Before: the HTTP port and circus's control and event ports.
    assert listening == {http_port}, listening
    endpoints = arbiter_endpoints(server)
    assert set(endpoints) == {"control", "events"}, endpoints
    directory = endpoints["control"].parent
    info = directory.stat()
    assert info.st_mode & 0o777 == 0o700 and info.st_uid == arbiter.uids().real, oct(info.st_mode)
    print(f"\nprocess manager: TCP ports {sorted(listening)} (HTTP only); endpoints in {directory} (0700)")


def test_the_server_user_still_commands_the_process_manager(server: Server) -> None:
    from circus.client import CircusClient

    client = CircusClient(endpoint=f"ipc://{arbiter_endpoints(server)['control']}", timeout=10)
    try:
        answer = client.call({"command": "list", "properties": {}})
    finally:
        client.stop()
    assert answer["status"] == "ok", answer
    assert any("flood_risk" in name for name in answer["watchers"]), answer


def test_another_local_user_cannot_reach_the_process_manager(server: Server) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None or not Path(SYSTEM_PYTHON).is_file():
        reason = "needs root, setpriv and /usr/bin/python3 to act as another user"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    endpoints = command_endpoints(server)
    assert len(endpoints) == 2, endpoints  # control and events
    for where in endpoints:
        # Before: both were TCP ports, and this connect (the first step of any command) worked.
        done = connect_as_nobody(where)
        assert done.returncode != 0 and "PermissionError" in done.stderr, (where, done.stderr)

    # Control: the same attempt reaches a socket that user may reach, so the refusal above
    # comes from the endpoints' directory, not from the attempt.
    open_dir = Path(tempfile.mkdtemp(prefix="flood-open-"))
    try:
        open_dir.chmod(0o755)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(open_dir / "open"))
        (open_dir / "open").chmod(0o777)
        listener.listen(1)
        done = connect_as_nobody(str(open_dir / "open"))
        listener.close()
        assert done.returncode == 0, done.stderr
    finally:
        shutil.rmtree(open_dir)


def connect_as_nobody(where: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         SYSTEM_PYTHON, "-c", CONNECT, where],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
