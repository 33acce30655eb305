"""Where an API worker's CPU goes: py-spy samples of one worker under load, by part.

Only the thread holding the GIL is sampled (``--gil``): a thread blocked in fsync or
waiting on PostgreSQL's socket is not using the CPU the requests compete for, and without
the flag py-spy counts it as busy.

Each sample (a stack of every thread that was running) is given to the part of its
innermost frame that belongs to one: a sample inside ``json`` called by the prediction log
is the log's, one inside OpenTelemetry called by BentoML's middleware is tracing's. The
shares, times the worker's measured CPU per request, give µs per request per part.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from benchmarks.servers import PeerError

# (part, substrings of a frame's "function (file:line)"), checked per frame from the
# innermost outwards; within one frame, the first part that matches.
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("prediction log", ("ops/predictionlog.py",)),
    ("rate limiter", ("ops/ratelimit.py", "redis/")),
    ("API keys", ("ops/keys.py",)),
    ("model, in process", ("serving/predictor.py", "serving/compiled.py", "onnxruntime/", "sklearn/")),
    (
        "runner hop (client side)",
        (
            "serving/coalescing.py",
            "aiohttp/",
            "_bentoml_impl/client",
            "_bentoml_sdk/",
            "bentoml/_internal/client",
        ),
    ),
    # py-spy names a namespace package's files by their last directories only
    # (opentelemetry/instrumentation/asgi/__init__.py is "asgi/__init__.py"): functions too.
    (
        "tracing (OpenTelemetry)",
        (
            "opentelemetry/",
            "OpenTelemetryMiddleware",
            "(asgi/__init__.py",
            "(trace/",
            "_start_internal_or_server_span",
            "TraceRecordFilter",
        ),
    ),
    ("access log and logging", ("bentoml/_internal/server/http/access", "logging/")),
    ("request metrics", ("bentoml/_internal/server/http/instruments", "prometheus_client/")),
    ("other BentoML middleware", ("bentoml/_internal/", "_bentoml_impl/", "serving/hardening.py")),
    (
        "our handler (FastAPI, validation, response)",
        ("serving/", "fastapi/", "pydantic", "starlette/", "core/"),
    ),
)
OTHER = "HTTP server, event loop, other"


def py_spy_binary() -> str:
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.is_file() else shutil.which("py-spy")
    if found is None:
        raise PeerError("py-spy is not installed (pip install py-spy, in the dev extras)")
    return found


def record(pid: int, *, duration_s: float, out: Path, rate: int = 250) -> Path:
    """Sample ``pid`` for ``duration_s`` into a collapsed-stack file (py-spy's raw format)."""
    command = [
        py_spy_binary(), "record", "--pid", str(pid), "--duration", str(max(1, round(duration_s))),
        "--rate", str(rate), "--format", "raw", "--nonblocking", "--gil", "--output", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=duration_s + 60)
    if done.returncode != 0 or not out.is_file():
        raise PeerError(f"py-spy failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return out


def part_of(stack: list[str]) -> str:
    for frame in reversed(stack):
        for part, needles in PARTS:
            if any(needle in frame for needle in needles):
                return part
    return OTHER


def shares(collapsed: Path) -> tuple[dict[str, float], int]:
    """Each part's share of the samples, and the number of samples."""
    counts: Counter[str] = Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        counts[part_of(stack.split(";"))] += int(count)
    total = sum(counts.values())
    if not total:
        return {}, 0
    return {part: n / total for part, n in counts.most_common()}, total


def breakdown(collapsed: Path, *, cpu_us_per_request: float, rows_per_request: int) -> dict[str, object]:
    """µs of the worker's CPU per request for each part (and per row for the log)."""
    by_share, samples = shares(collapsed)
    parts = {part: round(share * cpu_us_per_request, 1) for part, share in by_share.items()}
    log_us = parts.get("prediction log", 0.0)
    return {
        "samples": samples,
        "cpu_us_per_request": round(cpu_us_per_request, 1),
        "us_per_request": parts,
        "log_us_per_row": round(log_us / max(rows_per_request, 1), 2),
    }
