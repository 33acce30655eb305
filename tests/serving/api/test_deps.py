"""Who a request came from, for the failed-authentication limit (TRUSTED_PROXY_HOPS)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from starlette.requests import Request

from core.settings import get_settings
from serving.api.deps import client_address


def request_from(peer: str, *forwarded: str) -> Request:
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
    return Request({"type": "http", "headers": headers, "client": (peer, 40000)})


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], None]]:
    def set_hops(count: int) -> None:
        monkeypatch.setenv("TRUSTED_PROXY_HOPS", str(count))
        get_settings.cache_clear()

    yield set_hops
    get_settings.cache_clear()


@pytest.mark.security
def test_without_trusted_hops_the_header_is_ignored(hops: Callable[[int], None]) -> None:
    hops(0)
    assert client_address(request_from("10.0.0.5", "198.51.100.7")) == "10.0.0.5"


@pytest.mark.security
def test_each_trusted_hop_takes_one_entry_from_the_right(hops: Callable[[int], None]) -> None:
    hops(1)
    assert client_address(request_from("10.0.0.5", "203.0.113.10, 198.51.100.7")) == "198.51.100.7"
    hops(2)
    assert client_address(request_from("10.0.0.5", "203.0.113.10, 198.51.100.7")) == "203.0.113.10"
    # Repeated headers are one list, in order (RFC 9110 field lines).
    assert client_address(request_from("10.0.0.5", "203.0.113.10", "198.51.100.7")) == "203.0.113.10"


@pytest.mark.security
def test_a_short_or_forged_header_falls_back_to_the_peer(hops: Callable[[int], None]) -> None:
    hops(2)
    assert client_address(request_from("10.0.0.5", "198.51.100.7")) == "10.0.0.5"
    assert client_address(request_from("10.0.0.5")) == "10.0.0.5"
    hops(1)
    assert client_address(request_from("10.0.0.5", "evil\nforged line")) == "10.0.0.5"
    assert client_address(request_from("10.0.0.5", "2001:db8::1")) == "2001:db8::1"
