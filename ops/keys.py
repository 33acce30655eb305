"""API keys: issued once, stored only as a keyed hash, verified in well under a millisecond.

A key looks like ``fnq_<12 hex>_<43 url-safe chars>``. The first two parts are the public
prefix (lookup index and the id shown by ``flood keys list``); the 43 characters carry 256
random bits. The database holds HMAC-SHA256(SECRET_KEY, key), never the key.

Rotating SECRET_KEY overlaps: with the old secret in SECRET_KEY_PREVIOUS, a key hashed
under it still verifies until SECRET_KEY_PREVIOUS_UNTIL, and its first verification
re-hashes it under SECRET_KEY. Each row records which secret made its hash (``secret_id``,
a fingerprint, not the secret), so ``flood keys list`` can say which keys no configured
secret verifies any more.

Verification results are cached in-process for ``API_KEY_CACHE_SECONDS`` (default 10 s),
keyed by the HMAC digest, so a revocation takes effect on every worker within that time.
Expiry is checked on every call against the cached record, so it is exact.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core.errors import (
    ApiKeyError,
    AuthenticationError,
    ConfigurationError,
    DependencyUnavailableError,
)
from core.settings import Settings, get_settings
from ops.database import get_session_factory
from ops.tables import ApiKey

logger = logging.getLogger(__name__)

KEY_SCHEME = "fnq"
_PREFIX_RE = re.compile(rf"^{KEY_SCHEME}_[0-9a-f]{{12}}$")
_KEY_RE = re.compile(rf"^({KEY_SCHEME}_[0-9a-f]{{12}})_([A-Za-z0-9_-]{{43}})$")
DEV_SECRET_FILE = "dev-secret-key"
# Unknown keys are remembered too (so guessing cannot hammer the database), in their own
# LRU of this size: a flood of guesses evicts only older guesses, never a real key's state.
_UNKNOWN_CACHE_MAX = 10_000
# After a failed lookup, keys with a last known state skip the database for this long, so
# an outage costs one connection attempt per pause instead of one per request.
_DB_RETRY_AFTER_S = 2.0


def resolve_secret_key(settings: Settings | None = None) -> bytes:
    """SECRET_KEY, or in development a random secret persisted under FLOOD_HOME.

    The development secret survives restarts so issued keys stay valid; production refuses
    it because every replica must share one secret.
    """
    settings = settings or get_settings()
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value().encode()
    if settings.is_production:
        raise ConfigurationError(
            "SECRET_KEY is not set; set it to at least 32 random characters, "
            'e.g. python -c "import secrets; print(secrets.token_urlsafe(48))"'
        )
    path = settings.flood_home.resolve() / DEV_SECRET_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(path, secrets.token_urlsafe(48))
        logger.info("created a development secret at %s", path)
    return path.read_text().strip().encode()


def _write_private(path: Path, text: str) -> None:
    # O_EXCL: two workers starting at once must not overwrite each other's secret.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def key_id_of(raw_key: str) -> str | None:
    """The public id (prefix) of a well-formed key, else None."""
    match = _KEY_RE.match(raw_key)
    return match.group(1) if match else None


def hash_key(raw_key: str, secret: bytes) -> str:
    return hmac.new(secret, raw_key.encode(), hashlib.sha256).hexdigest()


def secret_id(secret: bytes) -> str:
    """A public fingerprint of a secret: which one hashed a key, without revealing it."""
    return hmac.new(secret, b"floodingnaque api-key secret id", hashlib.sha256).hexdigest()[:12]


def extract_api_key(headers: Mapping[str, str]) -> str | None:
    """The key from ``X-API-Key`` or ``Authorization: Bearer`` (BentoML's client sends the
    latter). ``headers`` must look up case-insensitively, as HTTP frameworks' do."""
    value = headers.get("x-api-key")
    if value:
        return value.strip() or None
    authorization = headers.get("authorization") or ""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


@dataclass(frozen=True)
class ApiKeyInfo:
    """What a request may know about its key; never the key or its hash."""

    key_id: str
    name: str
    tier: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    rotated_to: str | None
    secret_id: str | None = None  # which secret hashed it (``secret_id``); None: not recorded yet

    @classmethod
    def from_row(cls, row: ApiKey) -> ApiKeyInfo:
        return cls(
            key_id=row.prefix,
            name=row.name,
            tier=row.tier,
            created_at=_aware(row.created_at),
            expires_at=_aware(row.expires_at) if row.expires_at else None,
            revoked_at=_aware(row.revoked_at) if row.revoked_at else None,
            rotated_to=row.rotated_to,
            secret_id=row.secret_id,
        )

    def status(self, now: datetime | None = None) -> str:
        now = now or datetime.now(UTC)
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        if self.expires_at is not None and self.rotated_to:
            return "rotating"
        return "active"


@dataclass(frozen=True)
class IssuedKey:
    """A freshly created key: ``raw_key`` is shown once and then forgotten."""

    raw_key: str
    info: ApiKeyInfo


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes even for timezone=True columns; they were stored as UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class ApiKeyStore:
    """Create, list, revoke, rotate and verify keys in the ops database."""

    def __init__(
        self,
        *,
        session_factory: sessionmaker[Session] | None = None,
        secret: bytes | None = None,
        previous_secrets: list[bytes] | None = None,
        cache_seconds: float | None = None,
        settings: Settings | None = None,
    ) -> None:
        self._settings = settings or get_settings()
        self._sessions = session_factory or get_session_factory(self._settings.effective_database_url)
        self._secret = secret if secret is not None else resolve_secret_key(self._settings)
        self._secret_id = secret_id(self._secret)
        self._previous = self._settings.previous_secrets if previous_secrets is None else previous_secrets
        self._previous_ids = {secret_id(s) for s in self._previous}
        self._cache_seconds = self._settings.api_key_cache_seconds if cache_seconds is None else cache_seconds
        self._stale_seconds = self._settings.api_key_stale_seconds
        # digest -> (fresh until, usable during an outage until, info); monotonic seconds.
        # Known keys only: bounded by the keys that exist, so nothing needs evicting.
        self._cache: dict[str, tuple[float, float, ApiKeyInfo | None]] = {}
        # digest -> fresh until, for keys the database did not know.
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._db_down_until = 0.0  # monotonic; 0 means the database is believed up

    # -- management -------------------------------------------------------------------

    def create_key(self, name: str, tier: str, *, expires_at: datetime | None = None) -> IssuedKey:
        tiers = self._settings.rate_limit_tiers
        if tier not in tiers:
            raise ApiKeyError(f"unknown tier {tier!r}; configured tiers: {', '.join(tiers)}")
        if not name.strip():
            raise ApiKeyError("a key needs a non-empty --name")
        prefix = f"{KEY_SCHEME}_{secrets.token_hex(6)}"
        raw_key = f"{prefix}_{secrets.token_urlsafe(32)}"
        row = ApiKey(
            prefix=prefix,
            key_hash=hash_key(raw_key, self._secret),
            secret_id=self._secret_id,
            name=name.strip(),
            tier=tier,
            created_at=datetime.now(UTC),
            expires_at=expires_at,
        )
        with self._sessions.begin() as session:
            session.add(row)
            session.flush()
            info = ApiKeyInfo.from_row(row)
        logger.info("created API key %s (%s, tier %s)", prefix, name, tier)
        return IssuedKey(raw_key=raw_key, info=info)

    def list_keys(self, *, include_inactive: bool = True) -> list[ApiKeyInfo]:
        with self._sessions() as session:
            rows = session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id))
            infos = [ApiKeyInfo.from_row(row) for row in rows]
        if include_inactive:
            return infos
        now = datetime.now(UTC)
        return [info for info in infos if info.status(now) in ("active", "rotating")]

    def secret_label(self, info: ApiKeyInfo) -> str:
        """Which configured secret verifies the key: ``current``, ``previous`` (re-hashed on
        first use), ``none`` (no configured secret: the key cannot work) or ``unrecorded``
        (issued before secrets were recorded; recorded on its next verification)."""
        if info.secret_id is None:
            return "unrecorded"
        if info.secret_id == self._secret_id:
            return "current"
        return "previous" if info.secret_id in self._previous_ids else "none"

    def revoke_key(self, key_id: str) -> ApiKeyInfo:
        with self._sessions.begin() as session:
            row = self._get_row(session, key_id)
            if row.revoked_at is not None:
                raise ApiKeyError(f"API key {key_id} was already revoked at {row.revoked_at}")
            row.revoked_at = datetime.now(UTC)
            info = ApiKeyInfo.from_row(row)
        logger.info("revoked API key %s", key_id)
        return info

    def rotate_key(self, key_id: str, *, grace_hours: float | None = None) -> IssuedKey:
        """Issue a successor with the same name and tier; the old key stays valid for
        ``grace_hours`` (default API_KEY_GRACE_HOURS) so clients can switch without downtime."""
        grace = self._settings.api_key_grace_hours if grace_hours is None else grace_hours
        with self._sessions() as session:
            old = self._get_row(session, key_id)
            old_info = ApiKeyInfo.from_row(old)
        if old_info.status() not in ("active", "rotating"):
            raise ApiKeyError(f"API key {key_id} is {old_info.status()}; create a new one instead")
        issued = self.create_key(old_info.name, old_info.tier, expires_at=old_info.expires_at)
        grace_end = datetime.now(UTC) + timedelta(hours=grace)
        with self._sessions.begin() as session:
            old = self._get_row(session, key_id)
            current_expiry = _aware(old.expires_at) if old.expires_at else None
            if current_expiry is None or current_expiry > grace_end:
                old.expires_at = grace_end
            old.rotated_to = issued.info.key_id
        logger.info("rotated API key %s -> %s", key_id, issued.info.key_id)
        return issued

    @staticmethod
    def _get_row(session: Session, key_id: str) -> ApiKey:
        if not _PREFIX_RE.match(key_id):
            raise ApiKeyError(
                f"{key_id!r} is not a key id; ids look like {KEY_SCHEME}_0123456789ab (see `flood keys list`)"
            )
        row = session.scalar(select(ApiKey).where(ApiKey.prefix == key_id))
        if row is None:
            raise ApiKeyError(f"no API key with id {key_id}")
        return row

    # -- request path -----------------------------------------------------------------

    def verify_key(self, raw_key: str | None) -> ApiKeyInfo:
        """The key's info, or :class:`AuthenticationError` with reason ``missing``,
        ``unknown``, ``revoked`` or ``expired``; :class:`DependencyUnavailableError` when the
        database cannot be asked and the key is not cached. The key is never logged."""
        cached = self.verify_cached_key(raw_key)
        if cached is not None:
            return cached
        assert raw_key  # verify_cached_key refused a missing key
        digest = hash_key(raw_key, self._secret)
        last_known = self._cache.get(digest)
        usable = last_known is not None and last_known[1] > time.monotonic()
        if usable and self._db_down_until > time.monotonic():
            assert last_known is not None
            return self._accept(last_known[2])
        try:
            info = self._load_info(raw_key, digest)
        except DependencyUnavailableError:
            if not usable:
                raise
            assert last_known is not None
            # Revocations made during the outage cannot be seen anyway; expiry still is,
            # since _accept judges the remembered info against the current time.
            return self._accept(last_known[2])
        self._remember(digest, info, time.monotonic())
        return self._accept(info)

    def active_key_ids(self) -> frozenset[str]:
        """Ids (public prefixes) of every key not revoked; ``DependencyUnavailableError`` when
        the database cannot say."""
        try:
            with self._sessions() as session:
                return frozenset(session.scalars(select(ApiKey.prefix).where(ApiKey.revoked_at.is_(None))))
        except SQLAlchemyError:
            raise DependencyUnavailableError(
                "API keys cannot be listed right now (database unreachable)"
            ) from None

    def verify_cached_key(self, raw_key: str | None) -> ApiKeyInfo | None:
        """:meth:`verify_key` from the in-process cache alone, so it never waits on the
        database: the key's info or the same :class:`AuthenticationError`, or None when only
        the database can tell (the caller then runs ``verify_key`` where blocking is fine)."""
        if not raw_key:
            raise AuthenticationError("missing", "no API key: send X-API-Key or Authorization: Bearer")
        digest = hash_key(raw_key, self._secret)
        cached = self._cache.get(digest)
        if cached is None:
            unknown_until = self._unknown.get(digest)
            if unknown_until is not None and unknown_until > time.monotonic():
                return self._accept(None)
            return None
        if cached[0] <= time.monotonic():
            return None
        return self._accept(cached[2])

    @staticmethod
    def _accept(info: ApiKeyInfo | None) -> ApiKeyInfo:
        if info is None:
            raise AuthenticationError("unknown", "API key not recognised")
        status = info.status()
        if status == "revoked":
            raise AuthenticationError("revoked", f"API key {info.key_id} has been revoked")
        if status == "expired":
            raise AuthenticationError("expired", f"API key {info.key_id} has expired")
        return info

    def _load_info(self, raw_key: str, digest: str) -> ApiKeyInfo | None:
        info: ApiKeyInfo | None
        key_id = key_id_of(raw_key)
        if key_id is None:
            return None
        try:
            with self._sessions() as session:
                row = session.scalar(select(ApiKey).where(ApiKey.prefix == key_id))
                # Constant-time: timing must not tell how much of a guessed hash matched.
                matched = row is not None and hmac.compare_digest(row.key_hash, digest)
                if row is not None and not matched and self._previous:
                    matched = any(
                        hmac.compare_digest(row.key_hash, hash_key(raw_key, old)) for old in self._previous
                    )
                info = ApiKeyInfo.from_row(row) if row is not None and matched else None
                if (
                    row is not None
                    and matched
                    and (row.key_hash != digest or row.secret_id != self._secret_id)
                ):
                    info = self._rehash(session, row, digest) or info
        except SQLAlchemyError as exc:
            # A database outage must not turn every request into a 500 with a stack trace;
            # verify_key falls back to the last known state of keys it has seen.
            if not self._db_down_until:
                logger.error("API key lookup failed: %s; using last known key states", exc.__class__.__name__)
            self._db_down_until = time.monotonic() + _DB_RETRY_AFTER_S
            raise DependencyUnavailableError(
                "API keys cannot be checked right now (database unreachable)"
            ) from None
        if self._db_down_until:
            self._db_down_until = 0.0
            logger.warning("API key lookups reach the database again")
        return info

    def _rehash(self, session: Session, row: ApiKey, digest: str) -> ApiKeyInfo | None:
        """Move a verified key to the current secret; a failed write leaves it for next time."""
        prefix = row.prefix
        row.key_hash, row.secret_id = digest, self._secret_id
        try:
            session.commit()
        except SQLAlchemyError as exc:  # e.g. a read-only replica: the key still verified
            session.rollback()
            logger.warning("API key %s not re-hashed (%s); it still verifies", prefix, exc.__class__.__name__)
            return None
        logger.info("API key %s now hashed under the current SECRET_KEY", prefix)
        return ApiKeyInfo.from_row(row)

    def _remember(self, digest: str, info: ApiKeyInfo | None, now_mono: float) -> None:
        if self._cache_seconds <= 0:
            return
        with self._cache_lock:
            if info is None:
                self._cache.pop(digest, None)  # a deleted key is unknown from now on
                self._unknown[digest] = now_mono + self._cache_seconds
                self._unknown.move_to_end(digest)
                while len(self._unknown) > _UNKNOWN_CACHE_MAX:
                    self._unknown.popitem(last=False)
                return
            self._unknown.pop(digest, None)
            self._cache[digest] = (
                now_mono + self._cache_seconds,
                now_mono + max(self._cache_seconds, self._stale_seconds),
                info,
            )
