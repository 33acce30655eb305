"""Where the API workers' CPU goes: py-spy samples of every API worker under load, by part.

Every worker is sampled, not one: with few connections the kernel may hand all of them to
one worker, and a profile of the idle one would have no samples.

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


def record(pids: list[int], *, duration_s: float, out_dir: Path, stem: str, rate: int = 250) -> list[Path]:
    """Sample each of ``pids`` at once for ``duration_s``; one collapsed-stack file per pid
    (py-spy's raw format)."""
    seconds = str(max(1, round(duration_s)))
    running = []
    for pid in pids:
        out = out_dir / f"{stem}-{pid}.txt"
        command = [
            py_spy_binary(), "record", "--pid", str(pid), "--duration", seconds, "--rate", str(rate),
            "--format", "raw", "--nonblocking", "--gil", "--output", str(out),
        ]  # fmt: skip
        running.append(
            (out, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        )
    written = []
    for out, proc in running:
        try:
            _, stderr = proc.communicate(timeout=duration_s + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
        if proc.returncode != 0 or not out.is_file():
            raise PeerError(f"py-spy failed ({proc.returncode}): {stderr.strip()[-500:]}")
        written.append(out)
    return written


def part_of(stack: list[str]) -> str:
    for frame in reversed(stack):
        for part, needles in PARTS:
            if any(needle in frame for needle in needles):
                return part
    return OTHER


def shares(collapsed: list[Path]) -> tuple[dict[str, float], int]:
    """Each part's share of the samples of all files, and the number of samples."""
    counts: Counter[str] = Counter()
    for path in collapsed:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            counts[part_of(stack.split(";"))] += int(count)
    total = sum(counts.values())
    if not total:
        return {}, 0
    return {part: n / total for part, n in counts.most_common()}, total


def breakdown(
    collapsed: list[Path], *, cpu_us_per_request: float, rows_per_request: int
) -> dict[str, object]:
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
