"""A bounded soak: moderate steady load on a served Bento with full ops, RSS sampled.

``python -m tests.reliability.soak`` (or ``make soak``) builds a Bento from a synthetic
model in a temporary FLOOD_HOME, serves it with the prediction log in a fresh database on
the PostgreSQL at 127.0.0.1:5432 and rate limits in the Redis at 127.0.0.1:6379 (as CI
has them), sends about 60 requests a second for 10 minutes, and samples the resident
memory of the server's processes every few seconds. It passes when memory grew less than
10 % from the end of the warm-up to the end, no request failed, and every prediction is
in the log once. Figures are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from pydantic import SecretStr

from bundle.bentos import build_bento, find_bento
from bundle.model_import import import_registry_version
from core.settings import Settings, get_settings
from ops.database import dispose_engines, scratch_postgres_database
from ops.keys import ApiKeyStore
from ops.migrations import upgrade_database
from tests.conftest import POSTGRES_URL, REDIS_URL
from tests.reliability.load import log_counts
from tests.serving.conftest import TEST_TIERS, start_server, stop_server

DEFAULT_OUTPUT = Path(__file__).with_name(".soak-results.json")
DAY = {"temperature": 28, "humidity": 85, "rainfall": 50}
MAX_GROWTH = 0.10
BATCH_EVERY = 10  # every tenth request is a batch of BATCH_ROWS
BATCH_ROWS = 8


@dataclass
class SoakReport:
    duration_s: float
    warmup_s: float
    target_rps: float
    requests: int = 0
    errors: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    achieved_rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    rss_after_warmup_mib: float = 0.0
    rss_end_mib: float = 0.0
    rss_max_mib: float = 0.0
    rss_growth_pct: float = 0.0
    log_rows_expected: int = 0
    log_rows_found: int = 0
    log_rows_duplicated: int = 0
    load_average_start: list[float] = field(default_factory=list)
    load_average_end: list[float] = field(default_factory=list)
    rss_samples: list[tuple[float, float]] = field(default_factory=list)  # (s since start, MiB)

    @property
    def passed(self) -> bool:
        return (
            self.errors == 0
            and self.rss_growth_pct < MAX_GROWTH * 100
            and self.log_rows_found == self.log_rows_expected
            and self.log_rows_duplicated == 0
        )


def build_served_home(root: Path) -> tuple[Settings, Any]:
    """A FLOOD_HOME with one registered synthetic model and a Bento pinned to it."""
    import registry
    from training.pipeline import train_model
    from training.synthetic import generate_dataset

    os.environ["FLOOD_HOME"] = str(root)
    get_settings.cache_clear()
    settings = get_settings()
    result = train_model(generate_dataset(seed=0), n_estimators=60, seed=0)
    info = registry.log_training_run(result)
    tag = import_registry_version(info.version, settings=settings, workdir=root / "download")
    bento = find_bento(build_bento(tag, settings=settings), settings=settings)
    return settings, bento


def server_rss_mib(pid: int) -> float:
    """Resident memory of the arbiter and every process under it."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


async def run_load(
    url: str, key: str, *, duration_s: float, rps: float, concurrency: int, report: SoakReport, pid: int
) -> list[str]:
    """Paced load for ``duration_s``; the prediction-log ids of the answered requests."""
    numbers = itertools.count()
    run = uuid.uuid4().hex[:8]
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    logged: list[str] = []
    start = time.monotonic()
    interval = concurrency / rps

    async def worker(client: httpx.AsyncClient, offset: float) -> None:
        next_at = start + offset
        while True:
            now = time.monotonic()
            if now - start >= duration_s:
                return
            if next_at > now:
                await asyncio.sleep(next_at - now)
            next_at += interval
            n = next(numbers)
            request_id = f"{run}-{n}"
            batch = n % BATCH_EVERY == 0
            path = "/api/v1/predict/batch" if batch else "/api/v1/predict"
            body: dict[str, Any] = (
                {"observations": [DAY] * BATCH_ROWS} if batch else {**DAY, "rainfall": n % 300}
            )
            sent = time.perf_counter()
            try:
                answer = await client.post(path, json=body, headers={"X-Request-ID": request_id})
                status = str(answer.status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            latencies.append(time.perf_counter() - sent)
            statuses[status] += 1
            if status == "200":
                row_id = answer.json()["request_id"]  # the server's: the log's key
                logged.extend([f"{row_id}#{i}" for i in range(BATCH_ROWS)] if batch else [row_id])

    async def sample() -> None:
        while time.monotonic() - start < duration_s:
            report.rss_samples.append((round(time.monotonic() - start, 1), round(server_rss_mib(pid), 2)))
            await asyncio.sleep(5)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, headers={"X-API-Key": key}, timeout=30, limits=limits
    ) as client:
        workers = [worker(client, i * interval / concurrency) for i in range(concurrency)]
        await asyncio.gather(sample(), *workers)
    elapsed = time.monotonic() - start
    report.requests = sum(statuses.values())
    report.errors = report.requests - statuses["200"]
    report.statuses = dict(statuses)
    report.achieved_rps = report.requests / elapsed
    ordered = sorted(latencies)
    report.p50_ms = statistics.median(ordered) * 1000
    report.p99_ms = ordered[int(len(ordered) * 0.99) - 1] * 1000
    return logged


def summarise_rss(report: SoakReport) -> None:
    window = 30.0
    after_warmup = [mib for t, mib in report.rss_samples if report.warmup_s <= t < report.warmup_s + window]
    end = [mib for t, mib in report.rss_samples if t >= report.duration_s - window]
    report.rss_after_warmup_mib = statistics.mean(after_warmup)
    report.rss_end_mib = statistics.mean(end)
    report.rss_max_mib = max(mib for _, mib in report.rss_samples)
    report.rss_growth_pct = (
        100 * (report.rss_end_mib - report.rss_after_warmup_mib) / report.rss_after_warmup_mib
    )


def soak(*, duration_s: float, warmup_s: float, rps: float, concurrency: int, workdir: Path) -> SoakReport:
    report = SoakReport(duration_s=duration_s, warmup_s=warmup_s, target_rps=rps)
    settings, bento = build_served_home(workdir)
    with scratch_postgres_database(POSTGRES_URL, prefix="flood_soak") as database_url:
        upgrade_database(database_url)
        secret = SecretStr(os.urandom(36).hex())
        home = settings.model_copy(
            update={"database_url": database_url, "secret_key": secret, "rate_limit_tiers": TEST_TIERS}
        )
        key = ApiKeyStore(settings=home, cache_seconds=0).create_key("soak", "load").raw_key
        env = {
            "DATABASE_URL": database_url,
            "SECRET_KEY": secret.get_secret_value(),
            "REDIS_URL": REDIS_URL,
            "RATE_LIMIT_POLICY": "fail-open",
        }
        server = start_server(bento, settings=settings, log=workdir / "serve.log", env=env)
        try:
            report.load_average_start = [round(x, 2) for x in os.getloadavg()]
            logged = asyncio.run(
                run_load(
                    server.url,
                    key,
                    duration_s=duration_s,
                    rps=rps,
                    concurrency=concurrency,
                    report=report,
                    pid=server.process.pid,
                )
            )
            report.load_average_end = [round(x, 2) for x in os.getloadavg()]
        finally:
            stop_server(server.process)  # flushes the prediction log
        report.log_rows_expected = len(logged)
        counts = log_counts(database_url, logged, column="request_id")
        report.log_rows_found = len(counts)
        report.log_rows_duplicated = sum(n > 1 for n in counts.values())
        dispose_engines()
    summarise_rss(report)
    return report


def format_report(report: SoakReport) -> str:
    rows = [
        ("duration / warm-up", f"{report.duration_s:.0f} s / {report.warmup_s:.0f} s"),
        (
            "requests (target, achieved rate)",
            f"{report.requests} ({report.target_rps:.0f}/s, {report.achieved_rps:.1f}/s)",
        ),
        ("errors", f"{report.errors} {report.statuses}"),
        ("latency p50 / p99", f"{report.p50_ms:.1f} ms / {report.p99_ms:.1f} ms"),
        (
            "RSS after warm-up / end / max",
            f"{report.rss_after_warmup_mib:.1f} / {report.rss_end_mib:.1f} / {report.rss_max_mib:.1f} MiB",
        ),
        ("RSS growth after warm-up", f"{report.rss_growth_pct:+.2f} % (limit {MAX_GROWTH * 100:.0f} %)"),
        (
            "log rows found / expected / duplicated",
            f"{report.log_rows_found} / {report.log_rows_expected} / {report.log_rows_duplicated}",
        ),
        ("load average start / end", f"{report.load_average_start} / {report.load_average_end}"),
        ("result", "PASS" if report.passed else "FAIL"),
    ]
    return "\n".join(["| soak | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.reliability.soak", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument(
        "--warmup", type=float, default=60.0, help="seconds before the RSS baseline (default 60)"
    )
    parser.add_argument("--rps", type=float, default=60.0, help="requests per second (default 60)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    with tempfile.TemporaryDirectory(prefix="flood-soak-") as workdir:
        report = soak(
            duration_s=args.duration,
            warmup_s=args.warmup,
            rps=args.rps,
            concurrency=args.concurrency,
            workdir=Path(workdir),
        )
        if not report.passed:
            shutil.copy2(Path(workdir) / "serve.log", args.output.with_suffix(".serve.log"))
    print(format_report(report))
    args.output.write_text(json.dumps({**asdict(report), "passed": report.passed}, indent=2))
    print(f"figures written to {args.output}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
