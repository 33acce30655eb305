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
GOOD_SIGNING_KEY = secrets.token_urlsafe(48)
GOOD_BACKUP_KEY = secrets.token_urlsafe(48)


@pytest.fixture
def production(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("FLOOD_ENV", "production")
    monkeypatch.setenv("SECRET_KEY", GOOD_SECRET)
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg2://flood@db:5432/flood")
    monkeypatch.setenv("REDIS_URL", "redis://:pw@redis:6379/0")
    monkeypatch.setenv("MODEL_SIGNING_KEY", GOOD_SIGNING_KEY)
    monkeypatch.setenv("BACKUP_SIGNING_KEY", GOOD_BACKUP_KEY)
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
        ("REDIS_URL", None),
        ("MODEL_SIGNING_KEY", None),
        ("MODEL_SIGNING_KEY", "x"),
        ("BACKUP_SIGNING_KEY", None),
        ("BACKUP_SIGNING_KEY", ""),
        ("BACKUP_SIGNING_KEY", "backup-key"),
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


@pytest.mark.security
@pytest.mark.parametrize(
    "weak",
    [
        "Password123!Password123!Password",  # accepted before: 32 characters, 12 distinct
        "abcdefghijklmnopqrstuvwxyz012345",  # accepted before
        "Zq7!Kd9#Zq7!Kd9#Zq7!Kd9#Zq7!Kd9#",  # a repeated chunk
        "mYqWertyUiop-flood-prediction-key-2026",  # a keyboard row
        "0123456789abcdef0123456789abcdef",  # a sequence, repeated
    ],
)
def test_weak_secrets_are_refused_for_every_key(production: pytest.MonkeyPatch, weak: str) -> None:
    for variable in ("SECRET_KEY", "MODEL_SIGNING_KEY", "BACKUP_SIGNING_KEY"):
        production.setenv("SECRET_KEY", GOOD_SECRET)
        production.setenv("MODEL_SIGNING_KEY", GOOD_SIGNING_KEY)
        production.setenv("BACKUP_SIGNING_KEY", GOOD_BACKUP_KEY)
        production.setenv(variable, weak)
        assert variables("real") == [variable], (variable, weak)


@pytest.mark.security
def test_generated_secrets_pass_the_strength_rule() -> None:
    from ops.configcheck import secret_weakness

    refused = [s for s in (secrets.token_urlsafe(48) for _ in range(2000)) if secret_weakness(s)]
    assert len(refused) <= 3, refused  # measured: about 1 in 7,000
    assert secret_weakness("Tr0ub4dor&3-correct-horse-battery-staple") is None


@pytest.mark.security
def test_production_needs_shared_rate_limits_or_an_explicit_single_worker(
    production: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    production.delenv("REDIS_URL")
    assert variables("real") == ["REDIS_URL"]
    production.setenv("RATE_LIMIT_IN_PROCESS", "true")
    production.setenv("SERVING_API_WORKERS", "2")
    assert variables("real") == ["RATE_LIMIT_IN_PROCESS"]
    production.setenv("SERVING_API_WORKERS", "1")
    assert variables("real") == []
    with caplog.at_level("WARNING"):
        enforce_config(model_data_source="real")
    assert "RATE_LIMIT_IN_PROCESS=true" in caplog.text
    production.delenv("RATE_LIMIT_IN_PROCESS")
    production.setenv("RATE_LIMIT_STORAGE_URI", "redis+sentinel://sentinel:26379/mymaster")
    assert variables("real") == []


@pytest.mark.security
def test_model_signatures_are_required_by_default_in_production_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REQUIRE_MODEL_SIGNATURE", raising=False)
    get_settings.cache_clear()
    assert get_settings().signature_required is False
    monkeypatch.setenv("FLOOD_ENV", "production")
    get_settings.cache_clear()
    assert get_settings().signature_required is True
    monkeypatch.setenv("REQUIRE_MODEL_SIGNATURE", "false")
    get_settings.cache_clear()
    assert get_settings().signature_required is False


@pytest.mark.security
@pytest.mark.parametrize("value", [None, "", "backup-signing-key-changeme-0123456789"])
def test_production_refuses_a_missing_or_weak_backup_signing_key(
    production: pytest.MonkeyPatch, value: str | None
) -> None:
    # Without a strong key a forged dump with a matching manifest passes verify and restore.
    if value is None:
        production.delenv("BACKUP_SIGNING_KEY")
    else:
        production.setenv("BACKUP_SIGNING_KEY", value)
    get_settings.cache_clear()
    (problem,) = find_config_problems(model_data_source="real")
    assert problem.variable == "BACKUP_SIGNING_KEY"
    assert ("forged" in problem.problem) if not value else ("not a strong random secret" in problem.problem)
    assert "flood backup run" in problem.fix
    with pytest.raises(ConfigurationError, match="BACKUP_SIGNING_KEY"):
        enforce_config(model_data_source="real")
    # Development reports the same rule but does not refuse.
    production.setenv("FLOOD_ENV", "development")
    get_settings.cache_clear()
    assert "BACKUP_SIGNING_KEY" in variables("real")
    enforce_config(model_data_source="real")


@pytest.mark.security
def test_production_refuses_a_weak_previous_backup_signing_key(production: pytest.MonkeyPatch) -> None:
    # An old key still verifies backups, so a weak one lets a forgery in as a weak current key would.
    production.setenv("BACKUP_SIGNING_KEY_PREVIOUS", f'["{secrets.token_urlsafe(48)}", "backup-2025"]')
    get_settings.cache_clear()
    (problem,) = find_config_problems(model_data_source="real")
    assert problem.variable == "BACKUP_SIGNING_KEY_PREVIOUS[1]"
    assert "not a strong random secret" in problem.problem
    production.setenv("BACKUP_SIGNING_KEY_PREVIOUS", f'["{secrets.token_urlsafe(48)}"]')
    assert variables("real") == []
