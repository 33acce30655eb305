"""The served API against hostile clients: its own OpenAPI schema fuzzed over every route,
keys and secrets kept out of logs and error bodies, bounded metrics, an access log that
cannot be forged, no server banner, CORS only for configured origins, and production
refusing to start with authentication bypassed.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from pydantic import SecretStr
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

from bundle.bentos import find_bento
from core.settings import Settings
from ops.database import dispose_engines
from ops.keys import ApiKeyStore
from ops.migrations import upgrade_database
from serving.api.app import OPENAPI_PATH
from tests.reliability.conftest import Figure, record_figure
from tests.serving.conftest import TEST_TIERS, BuiltHome, Server, start_server, stop_server
from tests.serving.test_ops_http import expect_refusal

pytestmark = [pytest.mark.faults, pytest.mark.serve, pytest.mark.slow]

DAY = {"temperature": 28, "humidity": 85, "rainfall": 50}
ALLOWED_ORIGIN = "https://app.example.ph"
EXAMPLES_PER_OPERATION = 40


@dataclass(frozen=True)
class Served:
    server: Server
    home: Settings
    secret: str
    keys: ApiKeyStore
    key: str  # tier "load"

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def served(built_home: BuiltHome, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("edge-home")
    shutil.copytree(built_home.settings.bentoml_home, root / "bentoml", symlinks=True)
    secret = secrets.token_urlsafe(48)
    home = Settings(flood_home=root, secret_key=SecretStr(secret), rate_limit_tiers=TEST_TIERS)
    upgrade_database(home.effective_database_url)
    keys = ApiKeyStore(settings=home, cache_seconds=0)
    key = keys.create_key("edge", "load").raw_key
    bento = find_bento(built_home.bentos[max(built_home.bentos)].tag, settings=home)
    env = {"SECRET_KEY": secret, "CORS_ORIGINS": json.dumps([ALLOWED_ORIGIN])}
    server = start_server(bento, settings=home, log=root / "serve.log", env=env)
    try:
        yield Served(server, home, secret, keys, key)
    finally:
        stop_server(server.process)
        dispose_engines()


def fuzz(strategy: Any, checks: list[Any], *, base_url: str, auth: dict[str, str], sent: list[int]) -> None:
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def check(case: schemathesis.Case) -> None:
        response = case.call_and_validate(base_url=base_url, headers=auth, checks=checks, timeout=30)
        sent.append(response.status_code)

    check()


def test_schemathesis_finds_no_server_error_on_any_route(served: Served) -> None:
    schema = schemathesis.openapi.from_url(f"{served.url}{OPENAPI_PATH}")
    auth = {"X-API-Key": served.key}
    sent: list[int] = []
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert {op.path for op in operations} >= {"/api/v1/predict", "/api/v1/predict/batch", "/api/v1/model"}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            checks: list[Any] = [not_a_server_error]
            if mode is GenerationMode.POSITIVE:
                checks.append(response_schema_conformance)
            strategy = operation.as_strategy(generation_mode=mode)
            try:
                fuzz(strategy, checks, base_url=served.url, auth=auth, sent=sent)
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # a route without inputs has no invalid ones
    server_errors = sum(1 for status in sent if status >= 500 and status != 503)
    record_figure(
        Figure(
            "schemathesis, every route, positive + negative",
            len(sent),
            server_errors,
            None,
            None,
            f"{len(operations)} operations; statuses {sorted(set(sent))}",
        )
    )
    assert server_errors == 0


def series(metrics_text: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in metrics_text.splitlines() if line and not line.startswith("#")}


def test_metrics_stay_bounded_under_random_paths_and_keys(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=10) as client:

        def random_traffic(n: int) -> None:
            for _ in range(n):
                token = uuid.uuid4().hex
                client.get(f"/{token}")
                client.post(f"/api/v1/{token}", json=DAY)
                client.get(f"/api/v1/predict/{token}%0A{token}")
                client.post("/api/v1/predict", json=DAY, headers={"X-API-Key": f"fnq_{token[:12]}_{token}"})
                client.post("/api/v1/predict", json=DAY, headers={"X-API-Key": token})

        random_traffic(2)  # the bounded label values ("other", 404, reason "unknown") exist now
        before = series(client.get("/metrics").text)
        random_traffic(200)
        after = series(client.get("/metrics").text)
    new = after - before
    assert not new, sorted(new)[:10]
    assert not any(re.search(r'endpoint="/[0-9a-f]{32}', s) for s in after)


def test_keys_and_secrets_never_reach_logs_or_error_bodies(served: Served) -> None:
    revoked = served.keys.create_key("revoked", "load").raw_key
    served.keys.revoke_key(revoked[:16])
    guessed = f"fnq_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"
    malformed = "not-a-key-" + secrets.token_urlsafe(16)
    with httpx.Client(base_url=served.url, timeout=10) as client:
        assert client.post("/api/v1/predict", json=DAY, headers={"X-API-Key": served.key}).status_code == 200
        bearer = {"Authorization": f"Bearer {served.key}"}
        assert client.post("/api/v1/predict", json=DAY, headers=bearer).status_code == 200
        for raw in (revoked, guessed, malformed):
            for headers in ({"X-API-Key": raw}, {"Authorization": f"Bearer {raw}"}):
                refused = client.post("/api/v1/predict", json=DAY, headers=headers)
                assert refused.status_code == 401
                assert raw not in refused.text and raw[20:] not in refused.text
        # A key in the query string is not a way in, and is not echoed either.
        leaked = client.post(f"/api/v1/predict?api_key={guessed}", json=DAY)
        assert leaked.status_code == 401 and guessed not in leaked.text
        invalid = client.post("/api/v1/predict", json={**DAY, "humidity": served.key}, headers=bearer)
        assert invalid.status_code == 422 and served.key not in invalid.text
    log = served.server.log.read_text(errors="replace")
    for raw in (served.key, revoked, malformed, served.secret):
        assert raw not in log
    assert guessed not in log.replace(f"?api_key={guessed}", "")  # BentoML logs the path, not the query


def test_the_access_log_cannot_be_forged(served: Served) -> None:
    marker = f"forged-{uuid.uuid4().hex}"
    httpx.get(f"{served.url}/x%0A{marker}%0D%0A{marker}", timeout=10)
    time.sleep(0.5)
    lines = served.server.log.read_text(errors="replace").splitlines()
    assert any(marker in line for line in lines), "the request was not logged"
    assert not any(line.startswith(marker) for line in lines)


def test_no_server_banner(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=10) as client:
        answers = [
            client.get("/health"),
            client.get("/metrics"),
            client.get("/nowhere"),
            client.post("/api/v1/predict", json=DAY, headers={"X-API-Key": served.key}),
            client.post("/api/v1/predict", content=b"{", headers={"X-API-Key": served.key}),
        ]
    for answer in answers:
        assert "server" not in answer.headers, answer.headers
        assert "x-powered-by" not in answer.headers


def test_cors_only_for_configured_origins(served: Served) -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key,content-type",
    }
    with httpx.Client(base_url=served.url, timeout=10) as client:
        allowed = client.options("/api/v1/predict", headers={"Origin": ALLOWED_ORIGIN, **preflight})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
        assert "POST" in allowed.headers["access-control-allow-methods"]
        evil = client.options("/api/v1/predict", headers={"Origin": "https://evil.example", **preflight})
        assert evil.status_code == 400 and "access-control-allow-origin" not in evil.headers
        auth = {"X-API-Key": served.key}
        simple = client.post("/api/v1/predict", json=DAY, headers={"Origin": ALLOWED_ORIGIN, **auth})
        assert simple.status_code == 200
        assert simple.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
        assert "x-model-version" in simple.headers["access-control-expose-headers"].lower()
        other = client.post("/api/v1/predict", json=DAY, headers={"Origin": "https://evil.example", **auth})
        assert "access-control-allow-origin" not in other.headers


def test_production_refuses_to_start_with_auth_bypass(built_home: BuiltHome) -> None:
    env = {
        "FLOOD_ENV": "production",
        "AUTH_BYPASS_ENABLED": "true",
        # Everything else production asks for, so the bypass is named for what it is.
        "DATABASE_URL": "postgresql+psycopg2://flood@127.0.0.1:5432/flood",
        "SECRET_KEY": secrets.token_urlsafe(48),
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "MODEL_SIGNING_KEY": secrets.token_urlsafe(48),
        "BACKUP_SIGNING_KEY": secrets.token_urlsafe(48),
    }
    stderr = expect_refusal(built_home.bentos[max(built_home.bentos)], built_home.settings, env)
    assert "AUTH_BYPASS_ENABLED" in stderr
    for settled in ("DATABASE_URL", "SECRET_KEY", "REDIS_URL", "MODEL_SIGNING_KEY", "BACKUP_SIGNING_KEY"):
        assert f"{settled}:" not in stderr, stderr


def test_key_hashes_are_compared_in_constant_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A guess with the right prefix reaches the stored HMAC only through
    ``hmac.compare_digest``; timing the comparison instead would be noise on a shared CI box."""
    import hmac

    home = Settings(
        flood_home=tmp_path, secret_key=SecretStr(secrets.token_urlsafe(48)), rate_limit_tiers=TEST_TIERS
    )
    upgrade_database(home.effective_database_url)
    store = ApiKeyStore(settings=home, cache_seconds=0)
    key = store.create_key("timing", "load").raw_key
    compared: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        compared.append((a, b))
        return real(a, b)

    # The hmac module ops.keys uses (named by its import path: ops.keys does not re-export it).
    monkeypatch.setattr("ops.keys.hmac.compare_digest", spy)
    guess = key[:-1] + ("A" if key[-1] != "A" else "B")
    with pytest.raises(Exception, match="not recognised"):
        store.verify_key(guess)
    assert store.verify_key(key).key_id == key[:16]
    dispose_engines()
    assert len(compared) == 2 and all(len(a) == len(b) == 64 for a, b in compared)
