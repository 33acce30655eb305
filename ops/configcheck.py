"""Refuse unsafe production settings before the service starts, naming each variable and fix.

``find_config_problems`` evaluates the production rules whatever FLOOD_ENV says, so a
developer can see what production would refuse; ``enforce_config`` raises only for the
problems that apply to the current environment.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter
from dataclasses import dataclass

from pydantic import SecretStr
from sqlalchemy.engine import make_url

from core.errors import ConfigurationError
from core.settings import Settings, get_settings

logger = logging.getLogger(__name__)

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
# By the characters' own frequencies, which undercounts a random secret: 32 random hex digits
# (128 bits) estimate at 110-122.
MIN_SECRET_BITS = 100
SEQUENCE_RUN = 5  # abcde, 54321, asdfg
REPEAT_CHUNK = 5  # a 5-character chunk seen twice: p < 1e-5 for a random 64-character secret
_COMMON_WORDS = (
    "password",
    "passw0rd",
    "letmein",
    "welcome",
    "admin",
    "qwerty",
    "monkey",
    "dragon",
    "secret",
)
_KEYBOARD_ROWS = ("`1234567890-=", "qwertyuiop[]\\", "asdfghjkl;'", "zxcvbnm,./")
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


def secret_weakness(value: str) -> str | None:
    """Why ``value`` is not a strong secret, or None.

    A generated secret (``secrets.token_urlsafe(48)``: 64 characters, ~300 bits by the
    estimate below) passes every rule with overwhelming probability; what people type does
    not: placeholders and common words, runs along the alphabet, digits or a keyboard row,
    a repeated chunk, or too few bits by the characters' own frequencies.
    """
    if len(value) < MIN_SECRET_LENGTH:
        return f"only {len(value)} characters (at least {MIN_SECRET_LENGTH} needed)"
    lowered = value.lower()
    word = next((w for w in _PLACEHOLDER_FRAGMENTS + _COMMON_WORDS if w in lowered), None)
    if word is not None:
        return f"contains {word!r}, a placeholder or common word"
    run = _sequence_run(lowered)
    if run is not None:
        return f"contains the sequence {run!r}"
    repeated = _repeated_chunk(value)
    if repeated is not None:
        return f"repeats {repeated!r}"
    bits = _estimated_bits(value)
    if bits < MIN_SECRET_BITS:
        return f"about {bits:.0f} bits by its character frequencies (at least {MIN_SECRET_BITS} needed)"
    return None


def _sequence_run(lowered: str) -> str | None:
    for i in range(len(lowered) - SEQUENCE_RUN + 1):
        chunk = lowered[i : i + SEQUENCE_RUN]
        steps = {ord(b) - ord(a) for a, b in itertools.pairwise(chunk)}
        if steps in ({1}, {-1}) and chunk.isalnum():
            return chunk
        if any(chunk in row or chunk[::-1] in row for row in _KEYBOARD_ROWS):
            return chunk
    return None


def _repeated_chunk(value: str) -> str | None:
    seen: set[str] = set()
    for i in range(len(value) - REPEAT_CHUNK + 1):
        chunk = value[i : i + REPEAT_CHUNK]
        if chunk in seen:
            return chunk
        seen.add(chunk)
    return None


def _estimated_bits(value: str) -> float:
    counts = Counter(value)
    per_char = -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())
    return per_char * len(value)


def _required_secret_problem(
    variable: str, secret: SecretStr | None, *, unset: str = "not set", fix: str = ""
) -> ConfigProblem | None:
    fix = fix or f"set it to the output of {_GENERATE}"
    if secret is None or not secret.get_secret_value():
        return ConfigProblem(variable, unset, fix)
    weakness = secret_weakness(secret.get_secret_value())
    if weakness is not None:
        return ConfigProblem(variable, f"not a strong random secret: {weakness}", fix)
    return None


def _secret_problem(settings: Settings) -> ConfigProblem | None:
    return _required_secret_problem("SECRET_KEY", settings.secret_key)


def _backup_signing_key_problem(settings: Settings) -> ConfigProblem | None:
    return _required_secret_problem(
        "BACKUP_SIGNING_KEY",
        settings.backup_signing_key,
        unset="not set, so backups would be unsigned and a forged dump with a matching manifest "
        "would pass verify and restore",
        fix=f"set it to the output of {_GENERATE}, the same on every machine that writes or "
        "restores backups, then take a signed backup (flood backup run)",
    )


def _previous_backup_key_problems(settings: Settings) -> list[ConfigProblem]:
    # A weak old key lets a forgery in as surely as a weak current one.
    problems = []
    for index, secret in enumerate(settings.backup_signing_key_previous):
        problem = _required_secret_problem(
            f"BACKUP_SIGNING_KEY_PREVIOUS[{index}]",
            secret,
            unset="empty",
            fix="remove it, or list the real previous key",
        )
        if problem is not None:
            problems.append(problem)
    return problems


def _signing_key_problem(settings: Settings) -> ConfigProblem | None:
    if settings.model_signing_key is None or not settings.model_signing_key.get_secret_value():
        return None  # required or not: the REQUIRE_MODEL_SIGNATURE rule below says so
    return _required_secret_problem(
        "MODEL_SIGNING_KEY",
        settings.model_signing_key,
        fix=f"set it to the output of {_GENERATE} and re-sign the models (flood bento build)",
    )


def _rate_limit_problem(settings: Settings) -> ConfigProblem | None:
    if settings.effective_rate_limit_storage_uri != "memory://":
        return None
    if settings.rate_limit_in_process and settings.serving_api_workers == 1:
        return None
    if settings.rate_limit_in_process:
        return ConfigProblem(
            "RATE_LIMIT_IN_PROCESS",
            f"is true with SERVING_API_WORKERS={settings.serving_api_workers}: each worker would "
            "count its own limits, multiplying them",
            "set REDIS_URL, or SERVING_API_WORKERS=1 on a single replica",
        )
    return ConfigProblem(
        "REDIS_URL",
        "not set, so rate limits would be counted in each worker and replica separately",
        "set REDIS_URL=redis://:PASSWORD@HOST:6379/0 (or RATE_LIMIT_STORAGE_URI); for one worker "
        "on one replica only, RATE_LIMIT_IN_PROCESS=true with SERVING_API_WORKERS=1",
    )


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
    for found in (
        _secret_problem(settings),
        _signing_key_problem(settings),
        _backup_signing_key_problem(settings),
        _rate_limit_problem(settings),
    ):
        if found is not None:
            problems.append(found)
    problems.extend(_previous_backup_key_problems(settings))
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
    if settings.signature_required and settings.model_signing_key is None:
        problems.append(
            ConfigProblem(
                "MODEL_SIGNING_KEY",
                "not set while signatures are required (REQUIRE_MODEL_SIGNATURE, on by default in "
                "production), so no model can be verified",
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
    if settings.is_production and settings.rate_limit_in_process and not refused:
        logger.warning("RATE_LIMIT_IN_PROCESS=true: rate limits are counted in this one worker only")
    if refused:
        lines = "\n".join(f"  - {problem}" for problem in refused)
        raise ConfigurationError(
            f"refusing to start ({settings.flood_env}) with {len(refused)} problem(s):\n{lines}"
        )
