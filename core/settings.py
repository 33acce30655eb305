"""One settings object for the whole system, read once from the environment.

Variable names follow the earlier deployment's runbook where it had one (SECRET_KEY,
DATABASE_URL, ...), so operators keep their muscle memory. Everything has an embedded
default that works on a fresh machine: SQLite files and a local MLflow store under
FLOOD_HOME, no Redis, no broker.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MODEL_NAME = "flood-risk"
CHAMPION_ALIAS = "champion"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    flood_env: Literal["development", "production"] = "development"
    flood_home: Path = Path(".flood")
    # The shared real-data folder sits beside the repository on developer machines and CI.
    flood_data_dir: Path = Path("../shared/data")

    secret_key: SecretStr | None = None
    # A rotation's overlap: keys hashed under these still verify (and are re-hashed under
    # SECRET_KEY on first use) until SECRET_KEY_PREVIOUS_UNTIL. JSON list of secrets.
    secret_key_previous: list[SecretStr] = Field(default_factory=list)
    secret_key_previous_until: datetime | None = None
    database_url: str | None = None
    redis_url: str | None = None
    # Unset: on in production, off elsewhere (signature_required).
    require_model_signature: bool | None = None
    model_signing_key: SecretStr | None = None
    auth_bypass_enabled: bool = False
    db_pool_size: int = Field(default=5, ge=1, le=100)
    rate_limit_default: str = "5/minute;100/hour"
    # Per-tier limits ("5/minute;100/hour", ops.ratelimit.parse_limits); RATE_LIMIT_TIERS takes JSON.
    rate_limit_tiers: dict[str, str] = Field(
        default_factory=lambda: {
            "free": "5/minute;100/hour",
            "basic": "20/minute",
            "pro": "100/minute",
            "enterprise": "500/minute",
            "admin": "60/minute",
        }
    )
    # Keys of these tiers see /health/detailed and /health/ready in full (errors, hosts,
    # journal problems); everyone else sees statuses, latencies and counts only.
    health_detail_tiers: list[str] = Field(default_factory=lambda: ["admin"])
    # Cost per row for each route; routes not listed cost one per row.
    rate_limit_route_weights: dict[str, int] = Field(default_factory=dict)
    rate_limit_policy: Literal["fail-open", "fail-closed"] = "fail-open"
    # How long a charge waits on Redis before RATE_LIMIT_POLICY decides. The wait includes
    # the worker's own event-loop delay: at 250 ms a CPU-saturated worker timed out on a
    # healthy Redis, and under fail-closed a timeout refuses for the 5 s retry pause.
    rate_limit_redis_timeout_ms: int = Field(default=1000, ge=10, le=30_000)
    # Where the limits are counted (redis://, rediss://, unix:// or memory://); unset:
    # REDIS_URL, else in-process.
    rate_limit_storage_uri: str | None = None
    # Production refuses in-process limits (they multiply with workers and replicas) unless
    # this says a single API worker is meant; the start logs that choice.
    rate_limit_in_process: bool = False
    # Failed authentications (missing, unknown, revoked or expired keys) one client address
    # may make; past it, keys the worker has not cached are refused (429) without a
    # database lookup, so guessing can neither flood the database nor go on unbounded.
    auth_failure_limit: str = "30/minute;300/hour"
    # Proxies in front that append the client to X-Forwarded-For; 0 trusts no header and
    # uses the peer address. Too many lets clients pick their own address; too few puts
    # every client behind the proxy under one limit.
    trusted_proxy_hops: int = Field(default=0, ge=0, le=10)
    api_key_grace_hours: float = Field(default=24.0, ge=0)
    api_key_cache_seconds: float = Field(default=10.0, ge=0)
    # While the database is unreachable, a key checked within this window is still judged
    # by its last known state, so an outage does not lock out every client.
    api_key_stale_seconds: float = Field(default=3600.0, ge=0)
    prediction_log_flush_ms: int = Field(default=200, ge=1)
    # A journal segment closes at this many rows (or PREDICTION_LOG_FLUSH_MS) and ships as one
    # COPY; at 500 the batch route opened, fsynced and shipped a segment every two requests.
    prediction_log_batch_rows: int = Field(default=5000, ge=1)
    # durable: a prediction is answered only once its row is fsynced to the journal or
    # committed in the database (group commit: one fsync shared by the requests of a few
    # ms). async: answered at once; a crash can lose the last few ms of rows.
    prediction_log_durability: Literal["durable", "async"] = "durable"
    # A durable request whose row nothing can take within this is refused (503), not answered.
    prediction_log_commit_timeout_ms: int = Field(default=5000, ge=1)
    # Bounds every statement of the log's PostgreSQL connections, so a hung database counts
    # as down within seconds and rows wait in the journal.
    prediction_log_statement_timeout_ms: int = Field(default=10_000, ge=1)
    debug: bool = False
    cors_origins: list[str] = Field(default_factory=list)
    # Most observations one POST /api/v1/predict/batch may carry; more is answered with 413.
    predict_batch_max: int = Field(default=256, ge=1, le=10_000)
    # Coalescing in the API workers and adaptive batching in the model service; off only to
    # measure what they buy (benchmarks/).
    serving_batching: bool = True
    # API workers per `bentoml serve` (each holds its own key cache, limiter client and
    # prediction-log writer); "cpu_count" is one per core.
    serving_api_workers: int | Literal["cpu_count"] = "cpu_count"
    # OpenTelemetry spans for the prediction routes and the internal model service. Off by
    # default: BentoML records every span even at sample rate 0 (~0.3 ms a request).
    serving_tracing: bool = False
    # The API's access log (one line per request) and the internal model service's (one per
    # model call, ~1 ms of its CPU each; the API's line already names every request).
    serving_access_log: bool = True
    serving_model_access_log: bool = False
    # Call the model inside each API worker instead of the model service (which still
    # starts, idle): what `make bench` compares to show what the hop to the runner costs.
    serving_model_in_process: bool = False
    # Most bytes of request line plus headers one request may send; more is refused (431)
    # and the connection closed, so unterminated headers cannot pile up in a worker (uvicorn
    # bounds none: 50 x 1 MB added 52 MB to a worker and it kept 47). Our clients send a few
    # hundred bytes (the API key is ~60); 16 KiB is h11's and Node's default, and leaves
    # room for browser cookies on /docs.
    serving_max_header_bytes: int = Field(default=16 * 1024, ge=1024, le=1024 * 1024)
    # A connection must finish its request's headers this long after connecting, or after
    # its next request's first byte; else it is closed. Bounds slowloris and connections
    # that send nothing (uvicorn has no such timeout). Idle keep-alive between requests
    # keeps the serve's --timeout-keep-alive (bundle.bentos.KEEP_ALIVE_S).
    serving_header_timeout_s: float = Field(default=10.0, gt=0, le=300)

    # Celery: broker and result backend default to REDIS_URL, then to a local Redis (db 1:
    # db 0 is the rate limiter's and the tests'), so `celery -A ops.tasks worker` needs no
    # configuration.
    celery_broker_url: str | None = None
    celery_result_backend: str | None = None
    # A backup task is killed past this; the broker redelivers an unfinished one (worker
    # killed) after 1.2 x this + 10 s, so the default brings a lost backup back within 13 min.
    backup_time_limit_seconds: int = Field(default=600, ge=5)
    backup_keep_full: int = Field(default=7, ge=1)
    backup_keep_schema: int = Field(default=4, ge=1)
    # Safety backups taken by `flood backup restore` before it overwrites anything.
    backup_keep_safety: int = Field(default=3, ge=1)
    # HMAC key for backup manifests: anyone who can write the backup folder could otherwise
    # forge a dump and a matching manifest. Set, verify and restore refuse what it did not
    # sign; unset (development), backups are unsigned and reported as unauthenticated.
    backup_signing_key: SecretStr | None = None
    # A rotation's overlap: backups signed under these still verify and restore (new ones are
    # signed under BACKUP_SIGNING_KEY). JSON list of secrets; drop one once retention has
    # removed the backups it signed.
    backup_signing_key_previous: list[SecretStr] = Field(default_factory=list)
    prediction_log_retention_days: int = Field(default=90, ge=1)
    # "archive" writes expired rows to gzipped JSON lines under backups/ before deleting them.
    prediction_log_retention_mode: Literal["archive", "delete"] = "archive"

    mlflow_tracking_uri: str | None = None
    flood_model_name: str = MODEL_NAME
    flood_experiment: str = "flood-risk"

    @field_validator("flood_home", "flood_data_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @property
    def previous_secrets(self) -> list[bytes]:
        """SECRET_KEY_PREVIOUS while its window lasts, else nothing."""
        until = self.secret_key_previous_until
        if until is not None and (until if until.tzinfo else until.replace(tzinfo=UTC)) <= datetime.now(UTC):
            return []
        return [secret.get_secret_value().encode() for secret in self.secret_key_previous]

    @property
    def is_production(self) -> bool:
        return self.flood_env == "production"

    @property
    def signature_required(self) -> bool:
        """REQUIRE_MODEL_SIGNATURE, defaulting to on in production."""
        if self.require_model_signature is None:
            return self.is_production
        return self.require_model_signature

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{self.flood_home.resolve() / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        return self.flood_home.resolve() / "mlartifacts"

    @property
    def bentoml_home(self) -> Path:
        return self.flood_home.resolve() / "bentoml"

    @property
    def backup_dir(self) -> Path:
        return self.flood_home.resolve() / "backups"

    @property
    def celery_broker(self) -> str:
        return self.celery_broker_url or self.redis_url or "redis://127.0.0.1:6379/1"

    @property
    def celery_backend(self) -> str:
        return self.celery_result_backend or self.celery_broker

    @property
    def reports_dir(self) -> Path:
        return self.flood_home.resolve() / "reports"

    @property
    def effective_rate_limit_storage_uri(self) -> str:
        return self.rate_limit_storage_uri or self.redis_url or "memory://"

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.flood_home.resolve() / 'flood.db'}"


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings; tests call ``get_settings.cache_clear()`` after changing env."""
    return Settings()
