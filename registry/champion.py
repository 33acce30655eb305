"""Which version serves: the ``champion`` alias, its promotion rules and its history.

Rules (``promote_version``):
- a model trained on synthetic data is refused unless ``allow_synthetic``, and always in
  production (``FLOOD_ENV=production``);
- a model whose validation failed is refused unless ``allow_failed``, and always in
  production;
- the stored model files must still match the ``model_sha256`` recorded at registration.

History: every promotion and rollback is appended as a registered-model tag
``champion_history.<ns timestamp>`` holding a JSON event, so nothing is overwritten and
MLflow's own UI shows it. The newly crowned version also gets a ``promoted_at`` tag.
``rollback_champion`` replays the events as a stack (promote pushes, rollback pops) and
moves the alias to the champion before the current one: promoting 1, 2, 3 then rolling
back twice gives 2, then 1. A rollback is subject to the production rules above (a
development-only synthetic champion is not restored in production). Concurrent
promotions are not serialised; the last alias write wins.
"""

from __future__ import annotations

import getpass
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from core.errors import PromotionRefused, RegistryError
from core.settings import CHAMPION_ALIAS, get_settings
from registry.backend import connect, is_not_found
from registry.versions import (
    TAG_PROMOTED_AT,
    ModelVersionInfo,
    alias_version,
    fetch_model_version,
    model_name,
    verify_stored_model,
    version_info,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

HISTORY_TAG_PREFIX = "champion_history."


@dataclass(frozen=True)
class ChampionEvent:
    at: datetime  # UTC
    action: str  # "promote" | "rollback"
    version: int  # the champion after the event
    previous: int | None  # the champion before it
    user: str


def _current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


def _history(client: MlflowClient) -> list[ChampionEvent]:
    name = model_name()
    try:
        registered = client.get_registered_model(name)
    except Exception as exc:
        if is_not_found(exc):
            return []
        raise
    events = []
    for key, value in sorted((registered.tags or {}).items()):
        if not key.startswith(HISTORY_TAG_PREFIX):
            continue
        raw = json.loads(value)
        events.append(
            ChampionEvent(
                at=datetime.fromisoformat(raw["at"]),
                action=raw["action"],
                version=int(raw["version"]),
                previous=None if raw.get("previous") is None else int(raw["previous"]),
                user=raw.get("user", "unknown"),
            )
        )
    return events


def champion_history() -> list[ChampionEvent]:
    """Every promotion and rollback of the champion alias, oldest first."""
    return _history(connect())


def _champion_stack(events: list[ChampionEvent]) -> list[int]:
    stack: list[int] = []
    for event in events:
        if event.action == "promote" and (not stack or stack[-1] != event.version):
            stack.append(event.version)
        elif event.action == "rollback" and stack:
            stack.pop()
    return stack


def _current_champion(client: MlflowClient) -> int | None:
    return alias_version(client, CHAMPION_ALIAS)


def check_promotable(
    info: ModelVersionInfo, *, allow_synthetic: bool = False, allow_failed: bool = False
) -> None:
    """Raise ``PromotionRefused`` if the rules above forbid ``info`` as champion."""
    production = get_settings().is_production
    label = f"{info.name} v{info.version}"
    if info.is_synthetic:
        if production:
            raise PromotionRefused(
                f"{label} was trained on {info.data_source} data; "
                "a synthetic model never becomes champion in production"
            )
        if not allow_synthetic:
            raise PromotionRefused(
                f"{label} was trained on {info.data_source} data; "
                "pass --allow-synthetic (development only) to promote it anyway"
            )
    if info.validation_status != "passed":
        reason = f" ({info.validation_reason})" if info.validation_reason else ""
        if production:
            raise PromotionRefused(
                f"{label} failed validation{reason}; it cannot become champion in production"
            )
        if not allow_failed:
            raise PromotionRefused(
                f"{label} failed validation{reason}; pass --allow-failed (development only) "
                "to promote it anyway"
            )


def _crown(client: MlflowClient, version: int, *, action: str, previous: int | None) -> None:
    name = model_name()
    now = datetime.now(tz=UTC)
    client.set_registered_model_alias(name, CHAMPION_ALIAS, str(version))
    client.set_model_version_tag(name, str(version), TAG_PROMOTED_AT, now.isoformat())
    event = {
        "at": now.isoformat(),
        "action": action,
        "version": version,
        "previous": previous,
        "user": _current_user(),
    }
    # Nanosecond keys sort in time order and do not collide between quick successive calls.
    key = f"{HISTORY_TAG_PREFIX}{time.time_ns():020d}"
    client.set_registered_model_tag(name, key, json.dumps(event, sort_keys=True))
    logger.info("%s: champion %s -> v%s (%s)", name, previous, version, action)


def promote_version(
    version: int, *, allow_synthetic: bool = False, allow_failed: bool = False
) -> ModelVersionInfo:
    """Point ``champion`` at ``version`` (see the module docstring for the rules)."""
    client = connect()
    mv = fetch_model_version(client, version)
    info = version_info(client, mv)
    check_promotable(info, allow_synthetic=allow_synthetic, allow_failed=allow_failed)
    if info.is_champion:
        logger.info("%s v%s is already champion", info.name, version)
        return info
    verify_stored_model(client, mv)
    _crown(client, version, action="promote", previous=_current_champion(client))
    return version_info(client, fetch_model_version(client, version))


def rollback_champion() -> ModelVersionInfo:
    """Move ``champion`` back to the version that held it before the current one."""
    client = connect()
    name = model_name()
    current = _current_champion(client)
    if current is None:
        raise RegistryError(f"model {name!r} has no champion yet; nothing to roll back")
    stack = _champion_stack(_history(client))
    if not stack or stack[-1] != current:
        raise RegistryError(
            f"the champion alias of {name!r} (v{current}) was moved outside `flood models`, "
            "so there is no history to roll back along; promote a version explicitly"
        )
    if len(stack) < 2:
        raise RegistryError(f"v{current} is the first champion of {name!r}; nothing earlier")
    target = stack[-2]
    try:
        mv = fetch_model_version(client, target)
    except RegistryError:
        raise RegistryError(f"the previous champion v{target} no longer exists") from None
    info = version_info(client, mv)
    # It was promotable once; only the production rules can refuse it now.
    check_promotable(info, allow_synthetic=True, allow_failed=True)
    verify_stored_model(client, mv)
    _crown(client, target, action="rollback", previous=current)
    return version_info(client, fetch_model_version(client, target))
