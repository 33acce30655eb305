"""API keys: the auth matrix on SQLite and PostgreSQL, hashing, caching, secrets."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core.errors import (
    ApiKeyError,
    AuthenticationError,
    ConfigurationError,
    DependencyUnavailableError,
)
from core.settings import Settings, get_settings
from ops.database import get_engine, get_session_factory
from ops.keys import DEV_SECRET_FILE, ApiKeyStore, extract_api_key, key_id_of, resolve_secret_key
from ops.migrations import upgrade_database
from ops.tables import ApiKey

SECRET = b"s" * 16 + b"0123456789abcdef-test-secret"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, settings: Settings) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    upgrade_database(settings.effective_database_url)
    return settings.effective_database_url


@pytest.fixture
def store(database_url: str) -> ApiKeyStore:
    # No cache: each check must reflect the database, which the matrix is about.
    return ApiKeyStore(session_factory=get_session_factory(database_url), secret=SECRET, cache_seconds=0)


def reason_of(store: ApiKeyStore, raw_key: str | None) -> str:
    with pytest.raises(AuthenticationError) as caught:
        store.verify_key(raw_key)
    return caught.value.reason


def test_created_key_verifies_and_names_its_tier(store: ApiKeyStore) -> None:
    issued = store.create_key("alice", "pro")
    assert issued.raw_key.startswith(issued.info.key_id + "_")
    assert len(issued.raw_key.removeprefix(issued.info.key_id + "_")) >= 32
    info = store.verify_key(issued.raw_key)
    assert (info.key_id, info.name, info.tier) == (issued.info.key_id, "alice", "pro")


def test_auth_matrix(store: ApiKeyStore) -> None:
    good_issued = store.create_key("good", "free")
    good = good_issued.raw_key
    revoked = store.create_key("revoked", "free")
    store.revoke_key(revoked.info.key_id)
    expired = store.create_key("expired", "free", expires_at=datetime.now(UTC) - timedelta(seconds=1))
    wrong_secret = f"{good_issued.info.key_id}_{'A' * 43}"

    store.verify_key(good)
    assert reason_of(store, None) == "missing"
    assert reason_of(store, "") == "missing"
    assert reason_of(store, "not-a-key") == "unknown"
    assert reason_of(store, wrong_secret) == "unknown"
    assert reason_of(store, "fnq_000000000000_" + "B" * 43) == "unknown"
    assert reason_of(store, revoked.raw_key) == "revoked"
    assert reason_of(store, expired.raw_key) == "expired"


def test_rotation_keeps_both_keys_valid_until_grace_ends(store: ApiKeyStore, database_url: str) -> None:
    old = store.create_key("client", "basic")
    new = store.rotate_key(old.info.key_id, grace_hours=1)
    assert new.info.tier == "basic" and new.info.name == "client"
    assert store.verify_key(old.raw_key).rotated_to == new.info.key_id
    assert store.verify_key(new.raw_key).key_id == new.info.key_id

    # The grace period ends: move the old key's expiry into the past as time would.
    with get_engine(database_url).begin() as connection:
        connection.execute(
            text("UPDATE api_keys SET expires_at = :t WHERE prefix = :p"),
            {"t": datetime.now(UTC) - timedelta(seconds=1), "p": old.info.key_id},
        )
    assert reason_of(store, old.raw_key) == "expired"
    assert store.verify_key(new.raw_key).key_id == new.info.key_id


def test_rotating_a_revoked_key_is_refused(store: ApiKeyStore) -> None:
    issued = store.create_key("x", "free")
    store.revoke_key(issued.info.key_id)
    with pytest.raises(ApiKeyError, match="revoked"):
        store.rotate_key(issued.info.key_id)
    with pytest.raises(ApiKeyError, match="already revoked"):
        store.revoke_key(issued.info.key_id)


def test_active_key_ids_are_the_ids_of_keys_not_revoked(store: ApiKeyStore) -> None:
    kept, revoked = store.create_key("kept", "free"), store.create_key("gone", "free")
    store.revoke_key(revoked.info.key_id)
    assert key_id_of(kept.raw_key) == kept.info.key_id and key_id_of("not-a-key") is None
    assert kept.info.key_id in store.active_key_ids()
    assert revoked.info.key_id not in store.active_key_ids()


def test_management_errors_are_clear(store: ApiKeyStore) -> None:
    with pytest.raises(ApiKeyError, match="unknown tier"):
        store.create_key("x", "platinum")
    with pytest.raises(ApiKeyError, match="no API key with id"):
        store.revoke_key("fnq_0123456789ab")
    with pytest.raises(ApiKeyError, match="not a key id"):
        store.revoke_key("alice")


def test_only_a_keyed_hash_is_stored(store: ApiKeyStore, database_url: str) -> None:
    issued = store.create_key("alice", "free")
    with get_session_factory(database_url)() as session:
        row = session.scalars(select(ApiKey)).one()
    secret_part = issued.raw_key.removeprefix(issued.info.key_id + "_")
    stored = " ".join(str(getattr(row, c.key)) for c in ApiKey.__table__.columns)
    assert secret_part not in stored
    assert row.key_hash != issued.raw_key and len(row.key_hash) == 64
    other = ApiKeyStore(session_factory=get_session_factory(database_url), secret=b"another-secret" * 3)
    assert reason_of(other, issued.raw_key) == "unknown"


def test_revocation_takes_effect_within_the_cache_ttl(settings: Settings) -> None:
    upgrade_database()
    store = ApiKeyStore(secret=SECRET, cache_seconds=0.3)
    issued = store.create_key("cached", "free")
    store.verify_key(issued.raw_key)
    ApiKeyStore(secret=SECRET, cache_seconds=0).revoke_key(issued.info.key_id)
    store.verify_key(issued.raw_key)  # still cached: the documented window
    time.sleep(0.35)
    assert reason_of(store, issued.raw_key) == "revoked"


def test_expiry_is_exact_even_when_cached(settings: Settings) -> None:
    upgrade_database()
    store = ApiKeyStore(secret=SECRET, cache_seconds=60)
    issued = store.create_key("short", "free", expires_at=datetime.now(UTC) + timedelta(seconds=0.3))
    store.verify_key(issued.raw_key)
    time.sleep(0.35)
    assert reason_of(store, issued.raw_key) == "expired"


class SwitchableSessions:
    """Fault injection: the real session factory until ``down`` is set."""

    def __init__(self, real: sessionmaker[Session]) -> None:
        self.real, self.down = real, False

    def __call__(self) -> Session:
        if self.down:
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("database down"))
        return self.real()

    def begin(self) -> object:
        return self.real.begin()


def test_known_keys_survive_a_database_outage_past_the_cache_ttl(settings: Settings) -> None:
    upgrade_database()
    sessions = SwitchableSessions(get_session_factory(settings.effective_database_url))
    store = ApiKeyStore(session_factory=sessions, secret=SECRET, cache_seconds=0.1)  # type: ignore[arg-type]
    seen = store.create_key("seen", "pro")
    short = store.create_key("short", "free", expires_at=datetime.now(UTC) + timedelta(seconds=0.3))
    never_seen = store.create_key("never-seen", "pro")
    assert store.verify_key(seen.raw_key).key_id == seen.info.key_id
    store.verify_key(short.raw_key)
    sessions.down = True
    time.sleep(0.35)  # past the cache TTL and past the short key's expiry
    assert store.verify_key(seen.raw_key).key_id == seen.info.key_id
    assert reason_of(store, short.raw_key) == "expired"
    with pytest.raises(DependencyUnavailableError):
        store.verify_key(never_seen.raw_key)


def test_a_flood_of_unknown_keys_cannot_lock_a_known_key_out(settings: Settings) -> None:
    """Unknown keys used to share one cache with known ones, cleared at 10,000 entries: 28,000
    random keys during an outage wiped the known keys' last states, and they got 503."""
    import secrets as random_source

    upgrade_database()
    sessions = SwitchableSessions(get_session_factory(settings.effective_database_url))
    store = ApiKeyStore(session_factory=sessions, secret=SECRET, cache_seconds=30)  # type: ignore[arg-type]
    known = store.create_key("barangay", "pro")
    store.verify_key(known.raw_key)
    guesses = [f"fnq_{random_source.token_hex(6)}_{random_source.token_urlsafe(32)}" for _ in range(12_000)]
    for guess in guesses:  # the database answers "unknown" for each, once
        assert reason_of(store, guess) == "unknown"
    sessions.down = True
    for guess in random_source.SystemRandom().sample(guesses, 2_000):
        with pytest.raises((AuthenticationError, DependencyUnavailableError)):
            store.verify_key(guess)
    assert store.verify_key(known.raw_key).key_id == known.info.key_id
    # Guesses seen recently are refused from memory, without a database round trip.
    assert reason_of(store, guesses[-1]) == "unknown"


def test_database_outage_is_unavailable_not_unauthorised(tmp_path: Path) -> None:
    url = "postgresql+psycopg2://postgres@127.0.0.1:1/none"
    store = ApiKeyStore(session_factory=get_session_factory(url), secret=SECRET)
    with pytest.raises(DependencyUnavailableError):
        store.verify_key("fnq_0123456789ab_" + "C" * 43)
    with pytest.raises(DependencyUnavailableError):
        store.active_key_ids()


def test_headers_x_api_key_and_bearer() -> None:
    assert extract_api_key({"x-api-key": " k1 "}) == "k1"
    assert extract_api_key({"authorization": "Bearer k2"}) == "k2"
    assert extract_api_key({"authorization": "bearer k3"}) == "k3"
    assert extract_api_key({"authorization": "Basic dXNlcg=="}) is None
    assert extract_api_key({}) is None


def test_development_secret_is_stable_and_private(settings: Settings, flood_home: Path) -> None:
    first = resolve_secret_key(settings)
    assert resolve_secret_key(settings) == first and len(first) >= 32
    assert (flood_home / DEV_SECRET_FILE).stat().st_mode & 0o077 == 0


def test_production_refuses_a_missing_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOOD_ENV", "production")
    get_settings.cache_clear()
    with pytest.raises(ConfigurationError, match="SECRET_KEY"):
        resolve_secret_key()


NEW_SECRET = b"n" * 16 + b"fedcba9876543210-new-secret!"


def test_secret_rotation_overlaps_then_moves_keys_to_the_new_secret(database_url: str) -> None:
    """SECRET_KEY rotation without an outage: old keys keep working inside the window and
    move to the new secret on first use, so they outlive the old secret's removal."""
    sessions = get_session_factory(database_url)
    old_store = ApiKeyStore(session_factory=sessions, secret=SECRET, cache_seconds=0)
    old_keys = [old_store.create_key(f"client-{i}", "free").raw_key for i in range(20)]
    used, unused = old_keys[:15], old_keys[15:]

    rotating = ApiKeyStore(
        session_factory=sessions, secret=NEW_SECRET, previous_secrets=[SECRET], cache_seconds=0
    )
    assert {rotating.secret_label(info) for info in rotating.list_keys()} == {"previous"}
    rejected = [k for k in used if _refused(rotating, k)]
    assert rejected == [], f"{len(rejected)} old keys refused inside the window"
    new_key = rotating.create_key("after-rotation", "pro").raw_key
    labels = {info.name: rotating.secret_label(info) for info in rotating.list_keys()}
    assert {labels[f"client-{i}"] for i in range(15)} == {"current"}  # re-hashed on first use
    assert {labels[f"client-{i}"] for i in range(15, 20)} == {"previous"}
    assert labels["after-rotation"] == "current"

    # The window ends: the old secret is gone. Used keys were moved, unused ones are flagged.
    after = ApiKeyStore(session_factory=sessions, secret=NEW_SECRET, previous_secrets=[], cache_seconds=0)
    assert all(after.verify_key(k) for k in [*used, new_key])
    assert {reason_of(after, k) for k in unused} == {"unknown"}
    assert {
        after.secret_label(info) for info in after.list_keys() if info.name in ("client-15", "client-19")
    } == {"none"}


def _refused(store: ApiKeyStore, raw_key: str) -> bool:
    try:
        store.verify_key(raw_key)
    except AuthenticationError:
        return True
    return False


def test_previous_secrets_end_with_their_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_KEY_PREVIOUS", '["' + "o" * 40 + '"]')
    monkeypatch.setenv("SECRET_KEY_PREVIOUS_UNTIL", (datetime.now(UTC) + timedelta(hours=1)).isoformat())
    get_settings.cache_clear()
    assert get_settings().previous_secrets == [b"o" * 40]
    monkeypatch.setenv("SECRET_KEY_PREVIOUS_UNTIL", (datetime.now(UTC) - timedelta(seconds=1)).isoformat())
    get_settings.cache_clear()
    assert get_settings().previous_secrets == []
    get_settings.cache_clear()


def test_keys_issued_before_secret_ids_are_recorded_on_next_use(
    store: ApiKeyStore, database_url: str
) -> None:
    issued = store.create_key("legacy", "free")
    with get_session_factory(database_url).begin() as session:
        session.execute(text("UPDATE api_keys SET secret_id = NULL"))
    assert store.secret_label(store.list_keys()[0]) == "unrecorded"
    store.verify_key(issued.raw_key)
    assert store.secret_label(store.list_keys()[0]) == "current"
