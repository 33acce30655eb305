"""Refuse unsafe production settings before the service starts, naming each variable and fix.

``find_config_problems`` evaluates the production rules whatever FLOOD_ENV says, so a
developer can see what production would refuse; ``enforce_config`` raises only for the
problems that apply to the current environment.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import make_url

from core.errors import ConfigurationError
from core.settings import Settings, get_settings

MIN_SECRET_LENGTH = 32
# Fragments seen in sample .env files and tutorials. Each is long enough that a generated
# secret contains one by chance with negligible probability.
_PLACEHOLDER_FRAGMENTS = (
    "changeme",
    "change-me",
    "change_me",
    "placeholder",
    "your-secret",
    "your_secret",
    "yoursecret",
    "secret-key",
    "secret_key",
    "secretkey",
    "example",
    "insecure",
    "dev-secret",
)
_GENERATE = 'python -c "import secrets; print(secrets.token_urlsafe(48))"'


@dataclass(frozen=True)
class ConfigProblem:
    variable: str
    problem: str
    fix: str
    production_only: bool = True

    def applies(self, settings: Settings) -> bool:
        return settings.is_production or not self.production_only

    def __str__(self) -> str:
        return f"{self.variable}: {self.problem}. Fix: {self.fix}"


def _secret_problem(settings: Settings) -> ConfigProblem | None:
    if settings.secret_key is None or not settings.secret_key.get_secret_value():
        return ConfigProblem("SECRET_KEY", "not set", f"set it to the output of {_GENERATE}")
    value = settings.secret_key.get_secret_value()
    if len(value) < MIN_SECRET_LENGTH:
        return ConfigProblem(
            "SECRET_KEY",
            f"only {len(value)} characters (at least {MIN_SECRET_LENGTH} needed)",
            f"set it to the output of {_GENERATE}",
        )
    lowered = value.lower()
    if any(fragment in lowered for fragment in _PLACEHOLDER_FRAGMENTS) or len(set(value)) < 10:
        return ConfigProblem(
            "SECRET_KEY",
            "looks like a placeholder, not a random secret",
            f"set it to the output of {_GENERATE}",
        )
    return None


def find_config_problems(
    settings: Settings | None = None, *, model_data_source: str | None = None
) -> list[ConfigProblem]:
    """Every rule that fails; ``model_data_source`` is the served model's data_source tag."""
    settings = settings or get_settings()
    problems: list[ConfigProblem] = []
    if not settings.database_url:
        problems.append(
            ConfigProblem(
                "DATABASE_URL",
                "not set, so the embedded SQLite file would be used",
                "set DATABASE_URL=postgresql+psycopg2://USER:PASSWORD@HOST:5432/DB",
            )
        )
    elif make_url(settings.database_url).get_backend_name() == "sqlite":
        problems.append(
            ConfigProblem(
                "DATABASE_URL",
                "points at SQLite, which cannot be shared by replicas or survive a redeploy",
                "point DATABASE_URL at PostgreSQL (postgresql+psycopg2://...)",
            )
        )
    secret = _secret_problem(settings)
    if secret is not None:
        problems.append(secret)
    if settings.secret_key_previous and settings.secret_key_previous_until is None:
        problems.append(
            ConfigProblem(
                "SECRET_KEY_PREVIOUS_UNTIL",
                "not set, so keys hashed under the previous secret would verify forever",
                "set it to the end of the rotation window, e.g. 2026-12-09T00:00:00Z",
            )
        )
    if settings.auth_bypass_enabled:
        problems.append(
            ConfigProblem(
                "AUTH_BYPASS_ENABLED",
                "is true, so requests would be served without an API key",
                "set AUTH_BYPASS_ENABLED=false (or unset it)",
            )
        )
    if settings.debug:
        problems.append(
            ConfigProblem(
                "DEBUG", "is on, which exposes internals in errors", "set DEBUG=false (or unset it)"
            )
        )
    if "*" in settings.cors_origins:
        problems.append(
            ConfigProblem(
                "CORS_ORIGINS",
                "contains '*', so any web site may call the API from a browser",
                'list the allowed origins, e.g. CORS_ORIGINS=["https://app.example.ph"]',
            )
        )
    if model_data_source == "synthetic":
        problems.append(
            ConfigProblem(
                "FLOOD_MODEL_NAME",
                "the champion model was trained on synthetic data",
                "train on real data (`flood train`) and promote that version to champion",
            )
        )
    if settings.require_model_signature and settings.model_signing_key is None:
        problems.append(
            ConfigProblem(
                "MODEL_SIGNING_KEY",
                "not set while REQUIRE_MODEL_SIGNATURE=true, so no model can be verified",
                "set MODEL_SIGNING_KEY to the key models were signed with",
                production_only=False,
            )
        )
    return problems


def enforce_config(settings: Settings | None = None, *, model_data_source: str | None = None) -> None:
    """Raise :class:`ConfigurationError` listing every problem that applies here and now."""
    settings = settings or get_settings()
    refused = [
        problem
        for problem in find_config_problems(settings, model_data_source=model_data_source)
        if problem.applies(settings)
    ]
    if refused:
        lines = "\n".join(f"  - {problem}" for problem in refused)
        raise ConfigurationError(
            f"refusing to start ({settings.flood_env}) with {len(refused)} problem(s):\n{lines}"
        )
