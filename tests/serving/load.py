"""A small asyncio load generator for tests: N POSTs at a fixed concurrency."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class LoadReport:
    statuses: Counter[int | str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != 200)


async def post_many(
    url: str,
    body: dict[str, Any],
    *,
    requests: int,
    concurrency: int,
    keepalive: bool = True,
    headers: dict[str, str] | None = None,
) -> LoadReport:
    report = LoadReport()
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency if keepalive else 0
    )
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            queue.get_nowait()
            start = time.perf_counter()
            try:
                response = await client.post(url, json=body)
                report.statuses[response.status_code] += 1
            except httpx.HTTPError as exc:
                report.statuses[type(exc).__name__] += 1
            report.latencies_s.append(time.perf_counter() - start)

    start = time.perf_counter()
    async with httpx.AsyncClient(limits=limits, timeout=30, headers=headers) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    report.elapsed_s = time.perf_counter() - start
    return report
