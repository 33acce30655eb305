"""Two Bento replicas behind nginx (docker-compose.replicas.yml), sharing PostgreSQL and Redis:
one killed under load, and rate limits counted across both."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from tests.containers.conftest import (
    BASE_FILES,
    DAY,
    REPLICA_FILES,
    BuiltImage,
    Stack,
    new_key,
    run,
    running_stack,
    wait_until,
)
from tests.reliability.conftest import Figure, record_figure
from tests.reliability.load import BackgroundLoad

pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def replicas(images: list[BuiltImage], signing_key: str) -> Iterator[Stack]:
    with running_stack(BASE_FILES + REPLICA_FILES, images[-1], signing_key) as stack:
        seconds = stack.up()
        states = stack.services()
        assert {"bento", "bento-2", "lb"} <= set(states)
        assert all(states[name]["Health"] == "healthy" for name in ("bento", "bento-2", "lb"))
        record_figure(Figure("replicas stack up (2 bento + nginx)", 0, 0, None, seconds, ""))
        yield stack


def test_rate_limits_are_exact_across_the_replicas(replicas: Stack) -> None:
    key = new_key(replicas, tier="free")  # 5/minute
    sent = 12
    statuses = Counter(
        httpx.post(
            f"{replicas.url}/api/v1/predict", json=DAY, headers={"X-API-Key": key}, timeout=35
        ).status_code
        for _ in range(sent)
    )
    # Both replicas answered (round robin), yet the key got its 5 once, not once per replica.
    assert statuses == {200: 5, 429: sent - 5}
    record_figure(
        Figure(
            "rate limit across 2 replicas (free 5/min)",
            sent,
            0,
            None,
            None,
            f"{statuses[200]} of {sent} allowed",
        )
    )


def test_a_replica_killed_under_load_costs_no_client_error_and_no_row(replicas: Stack) -> None:
    key = new_key(replicas, tier="load")
    load = BackgroundLoad(replicas.url, {"X-API-Key": key}, concurrency=4, pause_s=0.01).start()
    time.sleep(4)
    victim = replicas.container_id("bento-2")
    killed_at = time.monotonic()
    run(["docker", "kill", victim])
    time.sleep(5)  # the balancer alone, on one replica
    # Docker counts `docker kill` as a manual stop, so the restart policy does not bring it
    # back: `up` does, as an operator (or an orchestrator) would. Healthy again is the recovery.
    replicas.up("bento-2")
    recovery = time.monotonic() - killed_at
    time.sleep(3)  # traffic on both again
    outcomes = load.stop()
    answered = {o.request_id for o in outcomes if o.status == 200}
    failed = [o for o in outcomes if o.status != 200]

    def all_shipped() -> bool:
        return answered <= {
            row for row in replicas.sql("SELECT client_request_id FROM prediction_log") if row
        }

    # Rows answered by the killed replica are in its journal volume, shipped once it is back.
    wait_until(all_shipped, timeout_s=60, every_s=2)
    logged = Counter(
        replicas.sql("SELECT client_request_id FROM prediction_log WHERE client_request_id IS NOT NULL")
    )
    lost = len(answered - set(logged))
    retried_twice = sum(1 for request_id in answered if logged[request_id] > 1)
    assert not failed, Counter(o.status for o in failed)
    assert lost == 0
    record_figure(
        Figure(
            "docker kill 1 of 2 replicas under load",
            len(outcomes),
            len(failed),
            lost,
            recovery,
            f"nginx retried; {retried_twice} request ids logged twice (retried after the kill)",
        )
    )
