"""Starting and stopping the four peers as real processes on loopback.

Each peer runs in its own session (process group) so stopping it reaches every worker.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.ceiling import MODEL_DIR_ENV, PIPELINE_SHA_ENV
from benchmarks.models import BenchModel
from core.errors import FloodError
from core.settings import Settings

PROJECT_DIR = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180
HOST = "127.0.0.1"


class PeerError(FloodError):
    """A peer did not start or does not answer correctly."""


@dataclass(frozen=True)
class PeerSpec:
    name: str
    label: str
    single_path: str
    batch_path: str
    body_format: str  # "flood" ({...} / {"observations": [...]}) or "mlflow" (dataframe_records)
    ready_path: str
    uses_key: bool = False
    batching: bool | None = None  # Bento peers only
    durability: str | None = None  # PREDICTION_LOG_DURABILITY; Bento peers only, None: the default
    model_in_process: bool = False  # SERVING_MODEL_IN_PROCESS; Bento peers only
    workers: dict[str, int] = field(default_factory=dict)
    # Further BentoML config (BENTOML_CONFIG_OVERRIDES), e.g. access logging off; Bento peers only.
    bento_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunningPeer:
    spec: PeerSpec
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def _workers(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def cpu_by_role(self) -> dict[str, tuple[int, float]]:
        """Per role (a Bento's service name, else "main" and "workers"): processes, CPU seconds."""
        out: dict[str, tuple[int, float]] = {}
        try:
            processes = [psutil.Process(self.process.pid), *self._workers()]
        except psutil.NoSuchProcess:
            return out
        for proc in processes:
            try:
                times = proc.cpu_times()
                role = service_name_of(proc.cmdline()) or (
                    "main" if proc.pid == self.process.pid else "workers"
                )
            except psutil.NoSuchProcess:
                continue
            count, seconds = out.get(role, (0, 0.0))
            out[role] = (count + 1, seconds + times.user + times.system)
        return out

    def pids_of(self, role: str) -> list[int]:
        pids = []
        for proc in self._workers():
            try:
                if service_name_of(proc.cmdline()) == role:
                    pids.append(proc.pid)
            except psutil.NoSuchProcess:
                continue
        return pids

    def worker_pids(self) -> list[int]:
        return [proc.pid for proc in self._workers()]


def service_name_of(argv: list[str]) -> str | None:
    """The BentoML service a worker process serves (its ``--service-name``), if any."""
    for flag, value in itertools.pairwise(argv):
        if flag == "--service-name":
            return value
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def bento_overrides(workers: dict[str, int], extra: dict[str, Any]) -> str:
    """BentoML's JSON config override: worker counts per service, plus ``extra`` per service."""
    services: dict[str, dict[str, Any]] = {name: {"workers": n} for name, n in workers.items()}
    for name, config in extra.get("services", {}).items():
        services.setdefault(name, {}).update(config)
    return json.dumps({**extra, "services": services})


def bento_command(
    spec: PeerSpec, model: BenchModel, *, settings: Settings, port: int
) -> tuple[list[str], dict[str, str]]:
    from bundle.bentos import bentoml_environ, find_bento, serve_argv

    env = bentoml_environ(settings)
    if spec.workers or spec.bento_config:
        env["BENTOML_CONFIG_OVERRIDES"] = bento_overrides(spec.workers, spec.bento_config)
    if spec.batching is not None:
        env["SERVING_BATCHING"] = "true" if spec.batching else "false"
    if spec.durability is not None:
        env["PREDICTION_LOG_DURABILITY"] = spec.durability
    if spec.model_in_process:
        env["SERVING_MODEL_IN_PROCESS"] = "true"
    return serve_argv(find_bento(model.bento_tag, settings=settings), host=HOST, port=port), env


def mlflow_command(
    spec: PeerSpec, model: BenchModel, *, settings: Settings, port: int
) -> tuple[list[str], dict[str, str]]:
    # mlflow execs `uvicorn` by name, so the venv's bin directory must be on PATH.
    bin_dir = str(Path(sys.executable).parent)
    # Both: MLflow resolves models:/ through MLFLOW_REGISTRY_URI when it is set.
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "MLFLOW_REGISTRY_URI": settings.tracking_uri,
    }
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    argv = [mlflow, "models", "serve", "-m", f"models:/{settings.flood_model_name}/{model.version}",
            "--env-manager", "local", "-h", HOST, "-p", str(port),
            "-w", str(spec.workers.get("workers", 1))]  # fmt: skip
    return argv, env


def ceiling_command(
    spec: PeerSpec, model: BenchModel, *, settings: Settings, port: int
) -> tuple[list[str], dict[str, str]]:
    env = {
        **os.environ,
        MODEL_DIR_ENV: str(model.model_dir),
        PIPELINE_SHA_ENV: model.pipeline_sha256,
        "PYTHONPATH": str(PROJECT_DIR),
    }
    argv = [sys.executable, "-m", "benchmarks.ceiling", "--workers", str(spec.workers.get("workers", 1)),
            "--host", HOST, "--port", str(port)]  # fmt: skip
    return argv, env


def command_for(
    spec: PeerSpec, model: BenchModel, *, settings: Settings, port: int
) -> tuple[list[str], dict[str, str]]:
    if spec.name.startswith("bento"):
        return bento_command(spec, model, settings=settings, port=port)
    if spec.name == "mlflow":
        return mlflow_command(spec, model, settings=settings, port=port)
    if spec.name == "ceiling":
        return ceiling_command(spec, model, settings=settings, port=port)
    raise PeerError(f"unknown peer {spec.name!r}")


def start_peer(
    spec: PeerSpec, model: BenchModel, *, settings: Settings, extra_env: dict[str, str], log: Path
) -> RunningPeer:
    port = free_port()
    argv, env = command_for(spec, model, settings=settings, port=port)
    env.update(extra_env)
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, env=env, cwd=PROJECT_DIR, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    running = RunningPeer(spec=spec, url=f"http://{HOST}:{port}", process=process, log=log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PeerError(f"{spec.name} exited at start: {log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(running.url + spec.ready_path, timeout=2).status_code == 200:
                return running
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_peer(running)
    raise PeerError(f"{spec.name} not ready in {START_TIMEOUT_S}s: {log.read_text(errors='replace')[-3000:]}")


def stop_peer(running: RunningPeer) -> None:
    """SIGTERM to the peer's process group, SIGKILL if it lingers."""
    process = running.process
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=40)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def post_json(url: str, body: str, *, api_key: str | None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["X-API-Key"] = api_key
    return httpx.post(url, content=body, headers=headers, timeout=60)


def check_answers(running: RunningPeer, *, single: str, batch: str, api_key: str | None) -> dict[str, Any]:
    """One request per route must succeed before load is applied; for keyed peers, a
    request without the key must be refused (the full stack really is on)."""
    facts: dict[str, Any] = {}
    for route, path, body in (
        ("single", running.spec.single_path, single),
        ("batch", running.spec.batch_path, batch),
    ):
        response = post_json(running.url + path, body, api_key=api_key)
        if response.status_code != 200:
            raise PeerError(f"{running.spec.name} {route}: HTTP {response.status_code} {response.text[:300]}")
        facts[f"{route}_response_bytes"] = len(response.content)
    if running.spec.uses_key:
        refused = post_json(running.url + running.spec.single_path, single, api_key=None)
        facts["status_without_key"] = refused.status_code
        facts["auth_enforced"] = refused.status_code == 401
    return facts
