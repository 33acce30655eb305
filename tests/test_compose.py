"""docker-compose.yml and the Prometheus files, checked without a Docker engine.

The file is parsed as Compose would read it (YAML anchors and ``${VAR}`` interpolation); the
environment given to our image is fed to the real Settings and configuration checks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from core.errors import BackupError
from core.settings import Settings, get_settings
from ops.backup import run_backup
from ops.configcheck import find_config_problems
from ops.migrations import upgrade_database
from ops.tasks import BACKUP_QUEUE, HEARTBEAT_SUFFIX, MAINTENANCE_QUEUE, celery_config
from serving.metrics import BackupMetricsCollector

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
SECRETS = (
    "BENTO_TAG",
    "POSTGRES_PASSWORD",
    "REDIS_PASSWORD",
    "SECRET_KEY",
    "MODEL_SIGNING_KEY",
    "BACKUP_SIGNING_KEY",
)
FLOOD_SERVICES = ("bento", "migrate", "worker", "beat")
ONE_SHOT = ("migrate",)
# What an operator would put in .env: random enough to pass the production checks.
ENVIRONMENT = {
    "BENTO_TAG": "20261129abcdef",
    "POSTGRES_PASSWORD": "4f1c0a9d8e7b6a5f4c3d2e1f0a9b8c7d",
    "REDIS_PASSWORD": "0d9c8b7a6f5e4d3c2b1a0f9e8d7c6b5a",
    "SECRET_KEY": "Vq3nH8xK2pLm9RtY6wZb4Cd7Fg1Js5Ne0Ua-Xo_Ik",
    "MODEL_SIGNING_KEY": "pT7vR2mW9qL4xN8cB3hJ6kF1sD5gZ0yA-Eu_Io",
    "BACKUP_SIGNING_KEY": "hY4kQ9wN2rT7vB1xM6cL3pZ8dF5gJ0sA-Wq_Ke",
}
VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``; ``$$`` is a dollar."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, operator, argument = match.groups()
        if env.get(name):
            return env[name]
        if operator and operator.endswith("?"):
            raise KeyError(f"{name}: {argument}")
        return argument if operator and operator.endswith("-") else ""

    return VARIABLE.sub(substitute, value.replace("$$", "\0")).replace("\0", "$")


@pytest.fixture(scope="module")
def raw() -> str:
    return COMPOSE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def compose(raw: str) -> dict[str, Any]:
    parsed: dict[str, Any] = interpolate(yaml.safe_load(raw), ENVIRONMENT)
    return parsed


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def test_the_production_services_are_there(compose: dict[str, Any]) -> None:
    assert set(services(compose)) == {
        "bento",
        "migrate",
        "worker",
        "beat",
        "redis",
        "postgres",
        "mlflow",
        "prometheus",
    }


def test_every_long_running_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, service in services(compose).items():
        if name in ONE_SHOT:
            assert service["restart"] == "no"
            continue
        assert service["restart"] == "unless-stopped", name
        check = service["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1, name
        assert check["interval"] and check["retries"] >= 3, name


def test_dependencies_wait_for_health_or_completion(compose: dict[str, Any]) -> None:
    for name, service in services(compose).items():
        for dependency, rule in service.get("depends_on", {}).items():
            expected = "service_completed_successfully" if dependency in ONE_SHOT else "service_healthy"
            assert rule == {"condition": expected}, (name, dependency)
    assert set(services(compose)["bento"]["depends_on"]) == {"postgres", "redis", "migrate"}
    assert set(services(compose)["worker"]["depends_on"]) == {"postgres", "redis", "migrate"}


def test_secrets_are_required_never_defaulted(raw: str) -> None:
    for name in SECRETS:
        uses = [m for m in VARIABLE.finditer(raw) if m.group(1) == name]
        assert uses, name
        assert all(m.group(2) == ":?" and m.group(3).strip() for m in uses), name
    for name in SECRETS:
        with pytest.raises(KeyError, match=name):
            interpolate(yaml.safe_load(raw), {k: v for k, v in ENVIRONMENT.items() if k != name})


def test_the_bento_and_its_workers_run_the_image_named_by_bento_tag(compose: dict[str, Any]) -> None:
    images = {services(compose)[name]["image"] for name in FLOOD_SERVICES}
    assert images == {f"flood_risk:{ENVIRONMENT['BENTO_TAG']}"}
    assert "3000:3000" in services(compose)["bento"]["ports"]


def test_our_environment_is_settings_and_passes_production_checks(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in FLOOD_SERVICES:
        environment = services(compose)[name]["environment"]
        assert set(environment) <= {field.upper() for field in Settings.model_fields}, name
    environment = services(compose)["worker"]["environment"]
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    settings = get_settings()

    assert settings.is_production
    assert find_config_problems(settings) == []
    assert settings.database_url == (
        f"postgresql+psycopg2://flood:{ENVIRONMENT['POSTGRES_PASSWORD']}@postgres:5432/flood"
    )
    assert settings.celery_broker.startswith("redis://") and settings.celery_broker.endswith("@redis:6379/1")
    assert celery_config(settings)["result_backend"] == settings.celery_broker
    postgres = services(compose)["postgres"]["environment"]
    assert postgres["POSTGRES_PASSWORD"] == ENVIRONMENT["POSTGRES_PASSWORD"]
    assert postgres["POSTGRES_USER"] == "flood" and postgres["POSTGRES_DB"] == "flood"


def test_worker_consumes_the_task_queues_and_keeps_backups_on_a_volume(compose: dict[str, Any]) -> None:
    worker = services(compose)["worker"]
    command = worker["command"]
    assert command[:4] == ["celery", "-A", "ops.tasks", "worker"]
    assert set(command[command.index("-Q") + 1].split(",")) == {BACKUP_QUEUE, MAINTENANCE_QUEUE}
    backup_dir = Settings(flood_home=Path(worker["environment"]["FLOOD_HOME"])).backup_dir
    assert f"backups:{backup_dir}" in worker["volumes"]
    # The service reads the same catalogue for its /metrics gauges, read-only.
    assert f"backups:{backup_dir}:ro" in services(compose)["bento"]["volumes"]
    assert {"backups", "postgres", "redis", "mlflow-artifacts", "prometheus"} <= set(compose["volumes"])


def test_beat_schedule_and_heartbeat_live_on_its_volume(compose: dict[str, Any]) -> None:
    beat = services(compose)["beat"]
    schedule = beat["command"][beat["command"].index("--schedule") + 1]
    (volume,) = beat["volumes"]
    assert str(Path(schedule).parent) == volume.split(":")[1]
    assert f"{schedule}{HEARTBEAT_SUFFIX}" in beat["healthcheck"]["test"][-1]


def test_mlflow_uses_postgresql_and_an_artifact_volume(compose: dict[str, Any]) -> None:
    mlflow = services(compose)["mlflow"]
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    destination = mlflow["command"][mlflow["command"].index("--artifacts-destination") + 1]
    assert f"mlflow-artifacts:{destination}" in mlflow["volumes"]
    init = ROOT / "deploy" / "postgres" / "init" / "01-mlflow-database.sql"
    assert "CREATE DATABASE mlflow" in init.read_text()
    # The tracking URI our image is given points at this service.
    assert services(compose)["bento"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_prometheus_scrapes_the_bento_metrics(compose: dict[str, Any]) -> None:
    prometheus = services(compose)["prometheus"]
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in prometheus["volumes"] if volume.startswith("./"))
    config_path = mounts["./deploy/prometheus.yml"]
    assert f"--config.file={config_path}" in prometheus["command"]
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())

    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "flood-bento"]
    bento_port = services(compose)["bento"]["ports"][0].split(":")[-1]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"bento:{bento_port}"]
    assert config["rule_files"] == [mounts["./deploy/alerts.yml"]]


def test_alerts_use_metrics_the_backup_collector_exports(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    upgrade_database(settings.effective_database_url)
    run_backup()
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{settings.flood_home / 'absent' / 'x.db'}")
    get_settings.cache_clear()
    with pytest.raises(BackupError):
        run_backup()
    registry = CollectorRegistry()
    registry.register(BackupMetricsCollector())
    exported = {
        sample.name
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }
    rules = yaml.safe_load((ROOT / "deploy" / "alerts.yml").read_text())
    expressions = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    used = {name for expr in expressions for name in re.findall(r"flood_backup_\w+", expr)}
    assert used == {"flood_backup_last_success_timestamp_seconds", "flood_backup_failures_total"}
    assert used <= exported
