"""What a service must establish before it serves: safe settings, a trusted model, a schema.

:func:`check_service_start` runs once in the ``bentoml serve`` process, before any worker
starts (BentoML's deployment hook), so a refusal stops the server with one clear message
instead of a worker crash loop. The model worker repeats the signature check when it loads
the model, which also covers a worker restarted later.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from core.errors import ConfigurationError, DependencyUnavailableError
from core.settings import Settings, get_settings
from ops.configcheck import enforce_config
from ops.database import dispose_engines
from ops.signing import check_model_at_start

logger = logging.getLogger(__name__)


def check_service_start(model_dir: Path, *, model_data_source: str, settings: Settings | None = None) -> None:
    """Raise a :class:`core.errors.FloodError` if the service must not start.

    In order: ``flood config check`` for this environment (production refusals), the model
    signature when REQUIRE_MODEL_SIGNATURE is on (no fallback), the ops database schema.
    """
    settings = settings or get_settings()
    enforce_config(settings, model_data_source=model_data_source)
    if check_model_at_start(model_dir, settings):
        logger.info("model signature verified for %s", model_dir)
    try:
        prepare_database(settings)
    finally:
        # This process supervises the workers for the server's lifetime; it must not
        # keep database connections it will never use again.
        dispose_engines()


def prepare_database(settings: Settings) -> None:
    """The embedded development SQLite is migrated here, so ``make run`` needs no step;
    any other database must already be at the newest revision (``flood db upgrade``), since
    a service should not migrate a database it shares with other replicas."""
    from ops.migrations import current_revision, head_revision, upgrade_database

    url = settings.effective_database_url
    if make_url(url).get_backend_name() == "sqlite" and not settings.is_production:
        with _migration_lock(settings):
            upgrade_database(url)
        return
    try:
        current = current_revision(url)
    except SQLAlchemyError as exc:
        raise DependencyUnavailableError(
            f"cannot read the ops database schema at DATABASE_URL ({exc.__class__.__name__}); "
            "is the database up and reachable?"
        ) from None
    head = head_revision()
    if current != head:
        raise ConfigurationError(
            f"the ops database schema is at revision {current or '(empty)'}, this code needs {head}; "
            "run `flood db upgrade` against DATABASE_URL, then start the service again"
        )


@contextlib.contextmanager
def _migration_lock(settings: Settings) -> Iterator[None]:
    """Serialises migrations of one FLOOD_HOME across processes started at the same time."""
    path = settings.flood_home.resolve() / "migrate.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
