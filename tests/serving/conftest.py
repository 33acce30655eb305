"""Fixtures for serving tests: registry versions, BentoML models, Bentos, served Bentos.

Building is slow (training, MLflow logging, ``bentoml build``), so one session-scoped
FLOOD_HOME holds two registry versions and a Bento for each; tests that only read share it.
Its embedded SQLite holds an API key of the ``load`` tier (limits far above any test's
traffic) for tests that are not about keys or limits.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bundle.bentos import BentoSummary, bentoml_environ, build_bento, find_bento, serve_argv
from bundle.model_import import import_registry_version
from core.settings import Settings, get_settings
from ops.database import dispose_engines
from ops.keys import ApiKeyStore
from ops.migrations import upgrade_database
from serving.model_store import read_model
from serving.predictor import Predictor, ServedModel

SERVE_START_TIMEOUT_S = 120
LOAD_TIER = "load"
# Every served test home runs with these tiers: one far above any test's traffic, and
# small ones whose limits the rate-limit tests reach on purpose.
TEST_TIERS = {
    "free": "5/minute;100/hour",
    LOAD_TIER: "1000000/minute",
    "tiny": "3/minute",
    "shared": "10/minute",
    "rows": "10/minute",
    "admin": "1000000/minute",  # sees health in full (HEALTH_DETAIL_TIERS' default)
}


@dataclass(frozen=True)
class BuiltHome:
    settings: Settings
    model_tags: dict[int, str]  # registry version -> BentoML model tag
    bentos: dict[int, BentoSummary]  # registry version -> Bento pinned to it
    api_key: str  # tier LOAD_TIER, in the home's SQLite

    @property
    def auth(self) -> dict[str, str]:
        return {"X-API-Key": self.api_key}


def tiers_env(tiers: dict[str, str]) -> dict[str, str]:
    return {"RATE_LIMIT_TIERS": json.dumps(tiers)}


def issue_key(settings: Settings, *, tier: str, name: str = "test") -> str:
    """A new key in ``settings``' database, the way `flood keys create` makes one."""
    return ApiKeyStore(settings=settings).create_key(name, tier).raw_key


@pytest.fixture(scope="session")
def built_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltHome]:
    """Two registry versions (different seeds and sizes) and a Bento built from each."""
    import registry
    from training.pipeline import train_model
    from training.synthetic import generate_dataset

    home = tmp_path_factory.mktemp("serving-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOOD_HOME", str(home))
        for var in ("DATABASE_URL", "REDIS_URL", "MLFLOW_TRACKING_URI", "FLOOD_ENV"):
            mp.delenv(var, raising=False)
        get_settings.cache_clear()
        settings = get_settings()
        model_tags: dict[int, str] = {}
        bentos: dict[int, BentoSummary] = {}
        for seed, trees in ((0, 40), (1, 60)):
            result = train_model(generate_dataset(seed=seed), n_estimators=trees, seed=seed)
            info = registry.log_training_run(result)
            tag = import_registry_version(
                info.version, settings=settings, workdir=home / f"download-{info.version}"
            )
            model_tags[info.version] = tag
            bento_tag = build_bento(tag, settings=settings)
            bentos[info.version] = find_bento(bento_tag, settings=settings)
        keyed = settings.model_copy(update={"rate_limit_tiers": TEST_TIERS})
        upgrade_database(keyed.effective_database_url)
        api_key = issue_key(keyed, tier=LOAD_TIER, name="serving-tests")
        dispose_engines()
        get_settings.cache_clear()
        yield BuiltHome(settings=settings, model_tags=model_tags, bentos=bentos, api_key=api_key)
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def served_model(built_home: BuiltHome) -> tuple[ServedModel, Path]:
    newest = max(built_home.model_tags)
    return read_model(built_home.model_tags[newest], store_dir=built_home.settings.bentoml_home / "models")


@pytest.fixture(scope="session")
def predictor(served_model: tuple[ServedModel, Path]) -> Predictor:
    served, model_dir = served_model
    return Predictor.from_model_dir(model_dir, expected_sha256=served.pipeline_sha256)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Server:
    url: str
    bento: BentoSummary
    process: subprocess.Popen[bytes]
    log: Path


def serve_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: the home's, the test tiers, no ops settings of this shell."""
    env = bentoml_environ(settings)
    for var in ("DATABASE_URL", "REDIS_URL", "FLOOD_ENV", "SECRET_KEY", "AUTH_BYPASS_ENABLED"):
        env.pop(var, None)
    # Every test sends its bad keys from 127.0.0.1, and the counts live in the shared Redis
    # for an hour: only the tests about it set a failed-auth limit they can reach.
    unlimited_failures = {"AUTH_FAILURE_LIMIT": "1000000/minute"}
    return {**env, **tiers_env(TEST_TIERS), **unlimited_failures, **(extra or {})}


def start_server(
    bento: BentoSummary, *, settings: Settings, log: Path, env: dict[str, str] | None = None
) -> Server:
    """``bentoml serve`` on a free port, ready; ``env`` is added to :func:`serve_env`."""
    port = free_port()
    full_env = serve_env(settings, env)
    with log.open("wb") as out:
        process = subprocess.Popen(
            serve_argv(bento, host="127.0.0.1", port=port),
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so teardown can stop the arbiter and its workers
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log)
    except RuntimeError:
        stop_server(process)
        raise
    return Server(url=url, bento=bento, process=process, log=log)


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until ``url/readyz`` answers 200; ``RuntimeError`` with the log's tail otherwise."""
    deadline = time.monotonic() + SERVE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"not ready in {SERVE_START_TIMEOUT_S}s: {log.read_text()[-3000:]}")


def stop_server(process: subprocess.Popen[bytes], *, grace_s: float = 40) -> int:
    """SIGTERM (graceful), then SIGKILL to the whole process group if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    return process.returncode


@contextlib.contextmanager
def serving(built_home: BuiltHome, version: int, log_dir: Path) -> Iterator[Server]:
    """The Bento pinned to registry ``version``, served over real HTTP until the block ends."""
    started = start_server(
        built_home.bentos[version], settings=built_home.settings, log=log_dir / "serve.log"
    )
    try:
        yield started
    finally:
        stop_server(started.process)


@pytest.fixture(scope="module")
def server(built_home: BuiltHome, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The newest Bento (pinned to the newest registry version), served over real HTTP."""
    with serving(built_home, max(built_home.bentos), tmp_path_factory.mktemp("serve")) as started:
        yield started
