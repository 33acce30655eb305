"""A real Prometheus scraping a served Bento, and promtool on the deployment's Prometheus files.

The binaries come from Debian's ``prometheus`` package (``.ci/run`` installs it): 2.42 at the
time of writing, older than the ``prom/prometheus`` image docker-compose.yml runs, so the
deployment files must stay within what both versions accept. The live Prometheus runs the
deployment's own configuration and alert rules, with only the addresses and intervals
rewritten for a test, so a config that Prometheus would refuse fails here first.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from core.settings import Settings, get_settings
from tests.conftest import IN_CI
from tests.serving.conftest import Server, free_port, start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
DEPLOY_CONFIG = ROOT / "deploy" / "prometheus.yml"
DEPLOY_RULES = ROOT / "deploy" / "alerts.yml"
COMPOSE = ROOT / "docker-compose.yml"
BENTO_JOB = "flood-bento"
PREDICTIONS = "flood_predictions_total"
BENTOML_REQUESTS = "bentoml_service_request_total"
PREDICT_ROUTE = "/api/v1/predict"
# One tier far above the test's traffic, so no request is refused by the rate limiter.
TIER = "scrape-test"
TIERS_ENV = {"RATE_LIMIT_TIERS": json.dumps({TIER: "100000/minute"})}
START_TIMEOUT_S = 60
SCRAPE_TIMEOUT_S = 30
# Rainfall from dry to extreme, so the requests land in more than one risk level.
OBSERVATIONS = [
    {"temperature": 28.0, "humidity": 60.0 + 3 * i, "rainfall": 18.0 * i, "rainfall_3d": 30.0 * i}
    for i in range(12)
]


def require_binary(name: str) -> str:
    """In CI a missing binary is a failure; locally the test skips and says why."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"`{name}` is not on PATH (Debian package `prometheus`)"
    if IN_CI:
        pytest.fail(message + "; .ci/run must install it")
    pytest.skip(message)


def container_to_local_paths() -> dict[str, Path]:
    """Paths inside the Prometheus container -> the repository files compose mounts there."""
    service = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]["prometheus"]
    mounts: dict[str, Path] = {}
    for volume in service["volumes"]:
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            mounts[target] = (ROOT / source).resolve()
    return mounts


def local_config(*, targets: dict[str, str] | None = None, interval: str | None = None) -> dict[str, Any]:
    """deploy/prometheus.yml with its container paths pointed at the repository files and,
    optionally, each job's targets and the global intervals replaced."""
    config: dict[str, Any] = yaml.safe_load(DEPLOY_CONFIG.read_text(encoding="utf-8"))
    mounts = container_to_local_paths()
    unmounted = [path for path in config.get("rule_files", []) if path not in mounts]
    assert not unmounted, f"rule_files not mounted into the container by docker-compose.yml: {unmounted}"
    config["rule_files"] = [str(mounts[path]) for path in config.get("rule_files", [])]
    if interval is not None:
        config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    if targets is not None:
        for job in config["scrape_configs"]:
            job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    return config


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = require_binary("promtool")
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, check=False)


def test_deployment_config_is_valid(tmp_path: Path) -> None:
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(local_config()), encoding="utf-8")
    done = run_promtool("check", "config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    # promtool loads the rule files the config names, so this also proves the path rewrite.
    assert str(DEPLOY_RULES.resolve()) in done.stdout + done.stderr


def test_alert_rules_are_valid() -> None:
    done = run_promtool("check", "rules", str(DEPLOY_RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    rules = yaml.safe_load(DEPLOY_RULES.read_text(encoding="utf-8"))
    count = sum(len(group["rules"]) for group in rules["groups"])
    assert f"SUCCESS: {count} rules found" in done.stdout


# -- a live Prometheus scraping a live Bento ------------------------------------------------


@dataclass(frozen=True)
class Scraped:
    server: Server
    settings: Settings
    api_key: str
    prometheus_url: str


@pytest.fixture(scope="module")
def served_bento(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Settings, str]]:
    """A small synthetic champion built into a Bento the way `flood bento build` does, served
    over HTTP, with an API key whose tier is far above the test's traffic."""
    import registry
    from bundle.bentos import build_bento, find_bento
    from bundle.model_import import import_registry_version
    from ops.keys import ApiKeyStore
    from ops.migrations import upgrade_database
    from training.pipeline import train_model
    from training.synthetic import generate_dataset

    home = tmp_path_factory.mktemp("prometheus-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOOD_HOME", str(home))
        mp.setenv("RATE_LIMIT_TIERS", TIERS_ENV["RATE_LIMIT_TIERS"])
        for var in ("FLOOD_ENV", "DATABASE_URL", "REDIS_URL", "MLFLOW_TRACKING_URI", "SECRET_KEY"):
            mp.delenv(var, raising=False)
        get_settings.cache_clear()
        settings = get_settings()
        info = registry.log_training_run(train_model(generate_dataset(seed=0), n_estimators=20))
        registry.promote_version(info.version, allow_synthetic=True)
        model_tag = import_registry_version(None, settings=settings, workdir=home / "download")
        bento = find_bento(build_bento(model_tag, settings=settings), settings=settings)
        upgrade_database(settings.effective_database_url)
        issued = ApiKeyStore(settings=settings).create_key("prometheus-test", TIER)
        get_settings.cache_clear()
        server = start_server(bento, settings=settings, log=home / "serve.log", env=TIERS_ENV)
        try:
            yield server, settings, issued.raw_key
        finally:
            stop_server(server.process)
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    return require_binary("prometheus")


@pytest.fixture(scope="module")
def scraped(
    prometheus_binary: str,  # first: a missing binary skips before the Bento is built
    served_bento: tuple[Server, Settings, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Scraped]:
    """Prometheus on a free loopback port, scraping the Bento every second."""
    server, settings, api_key = served_bento
    workdir = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    address = f"127.0.0.1:{port}"
    config = workdir / "prometheus.yml"
    targets = {BENTO_JOB: server.url.removeprefix("http://"), "prometheus": address}
    config.write_text(yaml.safe_dump(local_config(targets=targets, interval="1s")), encoding="utf-8")
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                prometheus_binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={address}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://{address}"
    try:
        wait_for(
            lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200,
            timeout=START_TIMEOUT_S,
            what="Prometheus ready",
            process=process,
            log=log,
        )
        yield Scraped(server=server, settings=settings, api_key=api_key, prometheus_url=url)
    finally:
        stop_server(process, grace_s=20)


def wait_for(
    condition: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise AssertionError(f"process exited while waiting for {what}: {tail}")
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def api(scraped: Scraped, path: str, **params: str) -> Any:
    response = httpx.get(f"{scraped.prometheus_url}/api/v1/{path}", params=params, timeout=10)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]


def query_by(scraped: Scraped, expression: str, label: str) -> dict[str, float]:
    """``sum by (label) (expression)`` as Prometheus sees it now; absent series are absent."""
    data = api(scraped, "query", query=f"sum by ({label}) ({expression})")
    return {sample["metric"].get(label, ""): float(sample["value"][1]) for sample in data["result"]}


def exposed_by(scraped: Scraped, name: str, label: str, **match: str) -> dict[str, float]:
    """The same sums read straight from the Bento's /metrics, for comparison."""
    text = httpx.get(f"{scraped.server.url}/metrics", timeout=10).text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == name and all(labels.get(k) == v for k, v in match.items()):
                key = labels.get(label, "")
                totals[key] = totals.get(key, 0.0) + sample.value
    return {key: value for key, value in totals.items() if value}


def bento_target(scraped: Scraped) -> dict[str, Any] | None:
    """The flood-bento target, or None until service discovery has produced it."""
    targets = api(scraped, "targets", state="active")["activeTargets"]
    found = [target for target in targets if target["labels"]["job"] == BENTO_JOB]
    assert len(found) <= 1, found
    return dict(found[0]) if found else None


def wait_until_bento_up(scraped: Scraped) -> dict[str, Any]:
    def up() -> bool:
        target = bento_target(scraped)
        return target is not None and target["health"] == "up"

    try:
        wait_for(up, timeout=SCRAPE_TIMEOUT_S, what=f"target {BENTO_JOB} up")
    except AssertionError:
        raise AssertionError(f"{BENTO_JOB} is not up: {bento_target(scraped)}") from None
    target = bento_target(scraped)
    assert target is not None
    return target


Grouped = tuple[str, str]  # (PromQL expression, label to sum by)


def wait_until_prometheus_sees(scraped: Scraped, expected: dict[Grouped, dict[str, float]]) -> None:
    """Until every grouped expression reads as expected in Prometheus (zeros ignored)."""

    def nonzero(grouped: Grouped) -> dict[str, float]:
        return {key: value for key, value in query_by(scraped, *grouped).items() if value}

    try:
        wait_for(
            lambda: all(nonzero(grouped) == want for grouped, want in expected.items()),
            timeout=SCRAPE_TIMEOUT_S,
            what="a scrape with the expected values",
        )
    except AssertionError:
        seen = {grouped: nonzero(grouped) for grouped in expected}
        raise AssertionError(f"Prometheus has {seen}, expected {expected}") from None


@pytest.mark.serve
@pytest.mark.slow
def test_prometheus_scrapes_the_bento_and_sees_predictions(scraped: Scraped) -> None:
    target = wait_until_bento_up(scraped)
    assert target["scrapeUrl"] == f"{scraped.server.url}/metrics"
    assert target["lastError"] == ""
    up = api(scraped, "query", query=f'up{{job="{BENTO_JOB}"}}')["result"]
    assert [float(sample["value"][1]) for sample in up] == [1.0]

    predictions = (PREDICTIONS, "risk_level")
    requests = (f'{BENTOML_REQUESTS}{{endpoint="{PREDICT_ROUTE}",http_response_code="200"}}', "endpoint")
    # Prometheus must agree with the service before the requests, or "rose by N" means nothing.
    before_levels = exposed_by(scraped, PREDICTIONS, "risk_level")
    before_requests = exposed_by(
        scraped, BENTOML_REQUESTS, "endpoint", endpoint=PREDICT_ROUTE, http_response_code="200"
    )
    wait_until_prometheus_sees(scraped, {predictions: before_levels, requests: before_requests})

    answered: Counter[str] = Counter()
    versions = set()
    headers = {"X-API-Key": scraped.api_key}
    with httpx.Client(base_url=scraped.server.url, headers=headers, timeout=30) as client:
        for observation in OBSERVATIONS:
            response = client.post(PREDICT_ROUTE, json=observation)
            assert response.status_code == 200, response.text
            answered[response.json()["risk_level"]] += 1
            versions.add(str(response.json()["model"]["version"]))

    expected_levels = {
        level: before_levels.get(level, 0.0) + answered[level] for level in {*before_levels, *answered}
    }
    expected_requests = {PREDICT_ROUTE: before_requests.get(PREDICT_ROUTE, 0) + len(OBSERVATIONS)}
    wait_until_prometheus_sees(scraped, {predictions: expected_levels, requests: expected_requests})
    # Every prediction is labelled with the one model version this Bento serves.
    assert set(query_by(scraped, PREDICTIONS, "model_version")) == versions
    assert sum(expected_levels.values()) - sum(before_levels.values()) == len(OBSERVATIONS)


@pytest.mark.serve
@pytest.mark.slow
def test_prometheus_loads_and_evaluates_the_alert_rules(scraped: Scraped) -> None:
    rules = yaml.safe_load(DEPLOY_RULES.read_text(encoding="utf-8"))
    declared = {group["name"]: {rule["alert"] for rule in group["rules"]} for group in rules["groups"]}
    wait_until_bento_up(scraped)

    def alert_rules() -> list[dict[str, Any]]:
        groups = api(scraped, "rules", type="alert")["groups"]
        return [{**rule, "group": group["name"]} for group in groups for rule in group["rules"]]

    def evaluated() -> bool:
        # Go's zero time ("0001-01-01T00:00:00Z") until a rule's first evaluation.
        return all(not rule["lastEvaluation"].startswith("0001-") for rule in alert_rules())

    wait_for(evaluated, timeout=SCRAPE_TIMEOUT_S, what="every alert rule evaluated")
    loaded = alert_rules()
    assert {(rule["group"], rule["name"]) for rule in loaded} == {
        (group, name) for group, names in declared.items() for name in names
    }
    assert all(rule["health"] == "ok" for rule in loaded), loaded
    (service_down,) = [rule for rule in loaded if rule["name"] == "FloodServiceDown"]
    assert service_down["state"] == "inactive"


@pytest.mark.serve
@pytest.mark.slow
def test_backup_gauges_reach_prometheus_and_quiet_the_backup_alerts(scraped: Scraped) -> None:
    from ops.backup import run_backup

    wait_until_bento_up(scraped)
    manifest = run_backup(kind="full", settings=scraped.settings)
    gauge = 'flood_backup_last_success_timestamp_seconds{kind="full"}'
    wait_until_prometheus_sees(scraped, {(gauge, "kind"): {"full": manifest.created_at.timestamp()}})
    # The two alerts' expressions, evaluated by Prometheus now: neither selects anything.
    rules = yaml.safe_load(DEPLOY_RULES.read_text(encoding="utf-8"))
    expressions = {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}
    for alert in ("FloodNoFullBackup", "FloodFullBackupOverdue", "FloodBackupFailures"):
        assert api(scraped, "query", query=expressions[alert])["result"] == [], alert
