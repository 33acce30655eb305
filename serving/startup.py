"""What a service must establish before it serves: safe settings, a trusted model, a schema.

:func:`check_service_start` runs once in the ``bentoml serve`` process, before any worker
starts (BentoML's deployment hook), so a refusal stops the server with one clear message
instead of a worker crash loop. The model worker repeats the signature check when it loads
the model, which also covers a worker restarted later.
"""

from __future__ import annotations

import logging
from pathlib import Path

from core.settings import Settings, get_settings
from ops.configcheck import enforce_config
from ops.database import dispose_engines
from ops.migrations import prepare_database
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
