"""Load from ``wrk`` on loopback: a Lua script rotates POST bodies and reports as JSON.

wrk (C, epoll) is the generator so the client is never what is measured; its own CPU
time is recorded per run anyway (``client_cores``), from the rusage of the finished child.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.errors import FloodError

RESULT_MARKER = "WRK_RESULT "
# Requests slower than this count as timeouts (errors), not as latency samples.
TIMEOUT_S = 10

# The Lua script: bodies are read from a file (one JSON document per line) and rotated,
# so the model sees varied rows; done() prints one JSON line the harness parses.
_LUA = r"""
local bodies = {}
for line in io.lines(os.getenv("WRK_BODIES")) do bodies[#bodies + 1] = line end
local headers = {["Content-Type"] = "application/json"}
local api_key = os.getenv("WRK_API_KEY")
if api_key and api_key ~= "" then headers["X-API-Key"] = api_key end
local counter = 0
wrk.method = "POST"

request = function()
  counter = counter + 1
  return wrk.format("POST", nil, headers, bodies[(counter % #bodies) + 1])
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}}\n',
    "RESULT_MARKER", summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
""".replace("RESULT_MARKER", RESULT_MARKER)


class LoadError(FloodError):
    """wrk is missing or did not report."""


@dataclass
class LoadResult:
    concurrency: int
    duration_s: float
    requests: int
    rows_per_request: int
    errors: dict[str, int]
    latency_ms: dict[str, float]
    client_cores: float
    loadavg: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0))
    threads: int = 1  # wrk's

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def throughput(self) -> float:
        """Requests per second (answered requests, errors included)."""
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def rows_per_s(self) -> float:
        good = max(0, self.requests - self.errors.get("status", 0))
        return good * self.rows_per_request / self.duration_s if self.duration_s else 0.0

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out.update(
            throughput_rps=round(self.throughput, 1),
            rows_per_s=round(self.rows_per_s, 1),
            error_count=self.error_count,
        )
        return out


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise LoadError("wrk is not installed (Debian: apt-get install -y wrk)")
    return found


def write_script(workdir: Path) -> Path:
    path = workdir / "post.lua"
    path.write_text(_LUA)
    return path


def write_bodies(workdir: Path, name: str, bodies: list[str]) -> Path:
    path = workdir / f"{name}.jsonl"
    path.write_text("".join(body.replace("\n", " ") + "\n" for body in bodies))
    return path


def run_wrk(
    url: str,
    *,
    script: Path,
    bodies: Path,
    concurrency: int,
    duration_s: float,
    rows_per_request: int,
    api_key: str | None = None,
) -> LoadResult:
    """One wrk run at a fixed number of open connections (one request in flight on each)."""
    threads = max(1, min(concurrency, os.cpu_count() or 1))
    command = [
        wrk_binary(),
        f"-t{threads}",
        f"-c{concurrency}",
        f"-d{max(1, round(duration_s))}s",
        f"--timeout={TIMEOUT_S}s",
        "-s",
        str(script),
        url,
    ]
    env = {**os.environ, "WRK_BODIES": str(bodies), "WRK_API_KEY": api_key or ""}
    loadavg = os.getloadavg()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith(RESULT_MARKER)), None)
    if done.returncode != 0 or line is None:
        raise LoadError(f"wrk failed ({done.returncode}): {done.stderr.strip()[-500:]} {done.stdout[-500:]}")
    report = json.loads(line.removeprefix(RESULT_MARKER))
    client_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    latency = {k: round(v / 1000.0, 3) for k, v in report["latency_us"].items()}
    return LoadResult(
        concurrency=concurrency,
        duration_s=report["duration_us"] / 1e6,
        requests=int(report["requests"]),
        rows_per_request=rows_per_request,
        errors={k: int(v) for k, v in report["errors"].items()},
        latency_ms=latency,
        client_cores=round(client_cpu / wall, 3) if wall else 0.0,
        loadavg=(round(loadavg[0], 2), round(loadavg[1], 2), round(loadavg[2], 2)),
        threads=threads,
    )
