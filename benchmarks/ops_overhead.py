"""What API-key check + rate limit + prediction-log enqueue add to one request, in-process.

    .venv/bin/python benchmarks/ops_overhead.py [--requests 5000]
        [--database-url postgresql+psycopg2://postgres@127.0.0.1:5432/test]
        [--redis-url redis://127.0.0.1:6379/0]

Without --database-url a throw-away SQLite file is used. Prints p50/p99 in microseconds for
each step and for the three together, as the service's request path runs them.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pydantic import SecretStr

from core.settings import Settings
from ops.database import dispose_engines, get_session_factory
from ops.keys import ApiKeyStore
from ops.migrations import upgrade_database
from ops.predictionlog import PredictionGroup, PredictionLog
from ops.ratelimit import RateLimiter


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered) * 1e6, p99 * 1e6


def measure(step: Callable[[], object], count: int) -> list[float]:
    for _ in range(min(200, count)):
        step()
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--database-url")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="flood-bench-"))
    settings = Settings(
        flood_home=home,
        database_url=args.database_url,
        secret_key=SecretStr("bench-" + uuid.uuid4().hex * 2),
        # A limit no benchmark reaches, so every hit takes the full "allowed" path.
        rate_limit_tiers={"bench": "100000000/minute;100000000/hour"},
    )
    upgrade_database(settings.effective_database_url)
    store = ApiKeyStore(
        settings=settings, session_factory=get_session_factory(settings.effective_database_url)
    )
    raw_key = store.create_key("benchmark", "bench").raw_key
    uncached = ApiKeyStore(
        settings=settings,
        session_factory=get_session_factory(settings.effective_database_url),
        cache_seconds=0,
    )
    limiter = RateLimiter(
        settings=settings, storage_uri=args.redis_url, key_prefix=f"flood-bench-{uuid.uuid4().hex}"
    )
    log = PredictionLog(settings=settings)
    log.start()
    identity = store.verify_key(raw_key).key_id

    def enqueue() -> None:
        row_id = uuid.uuid4().hex
        log.record(
            PredictionGroup(
                request_id=row_id,
                created_at=datetime.now(UTC),
                key_id=identity,
                model_version="1",
                bento_tag="flood-risk:bench",
                latency_ms=3.0,
                client_request_id=None,
                row_ids=(row_id,),
                inputs_json=('{"temperature":28.0,"humidity":80.0,"rainfall":12.5}',),
                probabilities=(0.42,),
                risk_levels=("Alert",),
            )
        )

    loop = asyncio.new_event_loop()

    def charge() -> None:
        # One charge per loop run: what a lone request pays (concurrent ones share a pipeline).
        loop.run_until_complete(limiter.hit(identity, "bench"))

    def request_path() -> None:
        store.verify_key(raw_key)
        charge()
        enqueue()

    n = args.requests
    results = {
        "key check (cached)": measure(lambda: store.verify_key(raw_key), n),
        "key check (database, cache miss)": measure(lambda: uncached.verify_key(raw_key), n // 5),
        f"rate limit hit ({limiter.backend}, 2 windows)": measure(charge, n),
        "prediction log enqueue": measure(enqueue, n),
        "all three (request path)": measure(request_path, n),
    }
    log.close()
    loop.close()
    dispose_engines()
    shutil.rmtree(home, ignore_errors=True)
    backend = settings.effective_database_url.split(":", 1)[0]
    print(f"database: {backend}   redis: {args.redis_url}   requests: {n}")
    print(f"{'step':<40} {'p50 µs':>10} {'p99 µs':>10}")
    for name, samples in results.items():
        p50, p99 = percentiles(samples)
        print(f"{name:<40} {p50:>10.1f} {p99:>10.1f}")
    print(f"rows written by the log: {log.rows_inserted}, journaled: {log.rows_journaled}")


if __name__ == "__main__":
    main()
