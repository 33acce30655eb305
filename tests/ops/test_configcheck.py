"""``flood config check`` and the start-up check: each refusal names the variable and fix."""

from __future__ import annotations

import secrets

import pytest
from typer.testing import CliRunner

from cli.main import app
from core.errors import ConfigurationError
from core.settings import get_settings
from ops.configcheck import enforce_config, find_config_problems

GOOD_SECRET = secrets.token_urlsafe(48)


@pytest.fixture
def production(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("FLOOD_ENV", "production")
    monkeypatch.setenv("SECRET_KEY", GOOD_SECRET)
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg2://flood@db:5432/flood")
    get_settings.cache_clear()
    return monkeypatch


def variables(model_data_source: str | None = None) -> list[str]:
    get_settings.cache_clear()
    return [p.variable for p in find_config_problems(model_data_source=model_data_source)]


def test_a_sound_production_configuration_passes(production: pytest.MonkeyPatch) -> None:
    assert variables("real") == []
    enforce_config(model_data_source="real")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DATABASE_URL", None),
        ("DATABASE_URL", "sqlite:////var/lib/flood.db"),
        ("SECRET_KEY", None),
        ("SECRET_KEY", "short-secret"),
        ("SECRET_KEY", "changeme-changeme-changeme-changeme-42"),
        ("SECRET_KEY", "a" * 40),
        ("AUTH_BYPASS_ENABLED", "true"),
        ("DEBUG", "true"),
        ("CORS_ORIGINS", '["*"]'),
    ],
)
def test_each_refusal_names_its_variable_and_fix(
    production: pytest.MonkeyPatch, variable: str, value: str | None
) -> None:
    if value is None:
        production.delenv(variable, raising=False)
    else:
        production.setenv(variable, value)
    get_settings.cache_clear()
    problems = find_config_problems(model_data_source="real")
    assert [p.variable for p in problems] == [variable]
    assert problems[0].fix
    with pytest.raises(ConfigurationError, match=variable):
        enforce_config(model_data_source="real")


def test_a_synthetic_data_model_is_refused(production: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match="synthetic"):
        enforce_config(model_data_source="synthetic")


def test_development_reports_but_does_not_refuse() -> None:
    assert "DATABASE_URL" in variables()
    enforce_config()


def test_signature_required_without_key_is_refused_everywhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REQUIRE_MODEL_SIGNATURE", "true")
    get_settings.cache_clear()
    with pytest.raises(ConfigurationError, match="MODEL_SIGNING_KEY"):
        enforce_config()


def test_cli_exit_code_follows_the_environment(production: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["config", "check", "--skip-model"])
    assert ok.exit_code == 0, ok.output
    production.setenv("DEBUG", "true")
    get_settings.cache_clear()
    refused = runner.invoke(app, ["config", "check", "--skip-model"])
    assert refused.exit_code == 1
    assert "DEBUG" in refused.output and "Fix:" in refused.output
