"""``make bench``: our Bento against mlflow serve and a bare ONNX ceiling, same model version.

    .venv/bin/python -m benchmarks.run [--smoke] [--duration 15] [--concurrency 1,16,64]
        [--models real,stress] [--peers bento,bento-async,bento-nobatch,mlflow,ceiling] [--out DIR]

Writes ``bench.json``, ``bench.md`` and ``bench.png`` under ``benchmarks/results/<time>/``
(server logs beside them) and prints the Markdown table. Needs wrk, PostgreSQL and Redis
(``--postgres-url`` is an admin URL: a fresh database is created there and dropped after).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import psutil

from benchmarks import loadgen
from benchmarks.inprocess import measure_inprocess
from benchmarks.models import (
    BenchModel,
    ForestSpec,
    complete_rows,
    register_and_build,
    train_real,
    train_stress,
)
from benchmarks.report import compute_ratios, judge_goals, plot_results, render_markdown
from benchmarks.servers import PeerError, PeerSpec, RunningPeer, check_answers, start_peer, stop_peer
from core.observation import FIELD_NAMES
from core.settings import Settings, get_settings
from ops.database import scratch_postgres_database

logger = logging.getLogger("benchmarks")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PEER_NAMES = ("bento", "bento-async", "bento-inprocess", "bento-nobatch", "mlflow", "ceiling")
# The switch serving must offer for the "batching off" peer (SERVING_BATCHING=false).
BATCHING_SETTING = "serving_batching"
PACKAGES = (
    "bentoml", "mlflow", "scikit-learn", "onnxruntime", "skl2onnx", "numpy", "pandas", "pydantic",
    "uvicorn", "starlette", "h11", "httptools", "uvloop", "redis", "hiredis", "SQLAlchemy",
    "psycopg2-binary", "skops",
)  # fmt: skip
API_SERVICE = "flood_risk"
# Profiled with py-spy: where the full stack's CPU goes, with and without the runner hop.
PROFILED_PEERS = ("bento", "bento-inprocess")
# A tier no benchmark reaches, so every request takes the limiter's full "allowed" path.
BENCH_TIER = "bench"
BENCH_TIER_LIMIT = "1000000000/minute"


@dataclass
class BenchConfig:
    smoke: bool = False
    duration_s: float = 15.0
    warmup_s: float = 3.0
    concurrencies: tuple[int, ...] = (1, 16, 64)
    batch_rows: int = 256
    models: tuple[str, ...] = ("real", "stress")
    peers: tuple[str, ...] = PEER_NAMES
    routes: tuple[str, ...] = ("single", "batch")
    real_trees: int | None = None  # None: the product's default
    stress: ForestSpec = field(default_factory=ForestSpec)
    api_workers: int | None = None  # None: the product's default (SERVING_API_WORKERS)
    model_workers: int | None = None
    bento_config: dict[str, Any] = field(default_factory=dict)
    mlflow_workers: int = 2
    ceiling_workers: int = 2
    inprocess_budget_s: float = 1.0
    profile_s: float = 8.0  # py-spy on the API workers per Bento peer and route; 0: off
    postgres_url: str = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
    redis_url: str = "redis://127.0.0.1:6379/14"
    out_dir: Path | None = None
    keep_home: bool = False  # keep FLOOD_HOME (registry, Bentos) for profiling by hand


SMOKE = BenchConfig(
    smoke=True,
    duration_s=1.0,
    warmup_s=1.0,
    concurrencies=(1, 4),
    batch_rows=16,
    models=("real",),
    real_trees=10,
    inprocess_budget_s=0.05,
    profile_s=2.0,
)


def batching_switch_available() -> bool:
    return BATCHING_SETTING in Settings.model_fields


def peer_specs(config: BenchConfig) -> dict[str, PeerSpec]:
    chosen = {"flood_risk": config.api_workers, "flood_risk_model": config.model_workers}
    bento_workers = {name: n for name, n in chosen.items() if n is not None}
    specs = {
        "bento": PeerSpec(
            "bento", "our Bento, full stack, adaptive batching", "/api/v1/predict", "/api/v1/predict/batch",
            "flood", "/readyz", uses_key=True, batching=True, workers=bento_workers,
            bento_config=config.bento_config,
        ),
        "bento-async": PeerSpec(
            "bento-async", "the same Bento, prediction log async (not durable before answered)",
            "/api/v1/predict", "/api/v1/predict/batch", "flood", "/readyz", uses_key=True, batching=True,
            durability="async", workers=bento_workers, bento_config=config.bento_config,
        ),
        "bento-inprocess": PeerSpec(
            "bento-inprocess", "the same Bento, the model called inside the API workers (no runner hop)",
            "/api/v1/predict", "/api/v1/predict/batch", "flood", "/readyz", uses_key=True, batching=True,
            model_in_process=True, workers=bento_workers, bento_config=config.bento_config,
        ),
        "bento-nobatch": PeerSpec(
            "bento-nobatch", "the same Bento, batching off", "/api/v1/predict", "/api/v1/predict/batch",
            "flood", "/readyz", uses_key=True, batching=False, workers=bento_workers,
            bento_config=config.bento_config,
        ),
        "mlflow": PeerSpec(
            "mlflow", "mlflow models serve --env-manager local", "/invocations", "/invocations",
            "mlflow", "/ping", workers={"workers": config.mlflow_workers},
        ),
        "ceiling": PeerSpec(
            "ceiling", "bare uvicorn + ONNX Runtime", "/predict", "/predict/batch",
            "flood", "/health", workers={"workers": config.ceiling_workers},
        ),
    }  # fmt: skip
    return {name: specs[name] for name in config.peers}


def request_bodies(body_format: str, route: str, *, batch_rows: int) -> list[str]:
    """Varied valid observations, every field present (mlflow's signature wants doubles)."""
    rows = complete_rows(max(64, batch_rows * 8), seed=11).loc[:, list(FIELD_NAMES)].to_dict("records")
    if route == "single":
        groups = [[r] for r in rows[:64]]
    else:
        groups = [rows[i : i + batch_rows] for i in range(0, batch_rows * 8, batch_rows)]
    if body_format == "mlflow":
        return [json.dumps({"dataframe_records": g}) for g in groups]
    if route == "single":
        return [json.dumps(g[0]) for g in groups]
    return [json.dumps({"observations": g}) for g in groups]


def machine_facts() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def wrk_version() -> str:
    done = subprocess.run([loadgen.wrk_binary(), "--version"], capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).split("Copyright")[0].strip()


def count_logged(database_url: str) -> int:
    from sqlalchemy import text

    from ops.database import get_engine

    with get_engine(database_url).connect() as connection:
        return int(connection.execute(text("SELECT count(*) FROM prediction_log")).scalar_one())


def stack_environment(config: BenchConfig, *, home: Path, database_url: str, secret: str) -> dict[str, str]:
    """What every server (and this process) runs with: the full ops stack, on real services."""
    defaults = Settings.model_fields["rate_limit_tiers"].get_default(call_default_factory=True)
    tiers = {**defaults, BENCH_TIER: BENCH_TIER_LIMIT}
    return {
        "FLOOD_HOME": str(home),
        "FLOOD_ENV": "development",
        "DATABASE_URL": database_url,
        "REDIS_URL": config.redis_url,
        "SECRET_KEY": secret,
        "RATE_LIMIT_TIERS": json.dumps(tiers),
        "AUTH_BYPASS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "BENTOML_DO_NOT_TRACK": "true",
    }


def create_bench_key(settings: Settings) -> str:
    from ops.database import get_session_factory
    from ops.keys import ApiKeyStore

    store = ApiKeyStore(
        settings=settings, session_factory=get_session_factory(settings.effective_database_url)
    )
    return store.create_key("benchmark", BENCH_TIER).raw_key


def measure_peer(
    running: RunningPeer,
    model: str,
    *,
    config: BenchConfig,
    workdir: Path,
    api_key: str | None,
    logs: Path,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    spec = running.spec
    script = loadgen.write_script(workdir)
    single = request_bodies(spec.body_format, "single", batch_rows=config.batch_rows)
    batch = request_bodies(spec.body_format, "batch", batch_rows=config.batch_rows)
    facts = check_answers(running, single=single[0], batch=batch[0], api_key=api_key)
    answered_rows = 1 + config.batch_rows  # check_answers
    runs: list[dict[str, Any]] = []
    for route in config.routes:
        bodies = single if route == "single" else batch
        path = spec.single_path if route == "single" else spec.batch_path
        rows = 1 if route == "single" else config.batch_rows
        body_file = loadgen.write_bodies(workdir, f"{spec.body_format}-{route}", bodies)
        load = partial(
            loadgen.run_wrk,
            running.url + path,
            script=script,
            bodies=body_file,
            rows_per_request=rows,
            api_key=api_key,
        )
        warm = load(concurrency=max(config.concurrencies), duration_s=config.warmup_s)
        answered_rows += (warm.requests - warm.errors["status"]) * rows
        for concurrency in config.concurrencies:
            cpu_before, wall_before = running.cpu_by_role(), time.perf_counter()
            result = load(concurrency=concurrency, duration_s=config.duration_s)
            wall = time.perf_counter() - wall_before
            cpu = cpu_spent(cpu_before, running.cpu_by_role())
            server_cores = sum(seconds for _, seconds in cpu.values()) / wall
            answered_rows += (result.requests - result.errors["status"]) * rows
            record = {"model": model, "peer": spec.name, "route": route, **result.as_dict()}
            record["server_cores"] = round(server_cores, 2)
            record["cpu_us_per_request"] = {
                role: round(seconds / max(result.requests, 1) * 1e6, 1) for role, (_, seconds) in cpu.items()
            }
            record["processes"] = {role: n for role, (n, _) in cpu.items()}
            record.update(wrk_check(result, wall_s=wall))
            runs.append(record)
            logger.info(
                "%s %s %s c%d: %.0f req/s, p99 %.1f ms, errors %d, server %.2f cores, wrk %.2f cores",
                model, spec.name, route, concurrency, result.throughput, result.latency_ms["p99"],
                result.error_count, server_cores, result.client_cores,
            )  # fmt: skip
        if config.profile_s and spec.name in PROFILED_PEERS and runs:
            profiled = profile_api_worker(
                running, load, concurrency=max(config.concurrencies), duration_s=config.profile_s,
                out_dir=logs, stem=f"profile-{model}-{spec.name}-{route}", measured=runs[-1],
            )  # fmt: skip
            answered_rows += profiled.pop("answered_requests") * rows
            runs[-1]["profile"] = profiled
    facts["answered_rows"] = answered_rows
    return runs, facts


def cpu_spent(
    before: dict[str, tuple[int, float]], after: dict[str, tuple[int, float]]
) -> dict[str, tuple[int, float]]:
    """Per role: processes, and CPU seconds spent between the two readings."""
    return {
        role: (n, max(seconds - before.get(role, (0, 0.0))[1], 0.0)) for role, (n, seconds) in after.items()
    }


def wrk_check(result: loadgen.LoadResult, *, wall_s: float) -> dict[str, float]:
    """wrk's own cost: µs of its CPU per request and how many times the measured rate its
    threads could send at that cost (below ~1.5 wrk, not the server, sets the pace)."""
    per_request_s = result.client_cores * wall_s / max(result.requests, 1)
    capacity = result.threads / per_request_s if per_request_s else float("inf")
    throughput = result.requests / result.duration_s if result.duration_s else 0.0
    return {
        "wrk_us_per_request": round(per_request_s * 1e6, 1),
        "wrk_headroom": round(capacity / throughput, 1) if throughput else 0.0,
    }


def profile_api_worker(
    running: RunningPeer,
    load: Any,
    *,
    concurrency: int,
    duration_s: float,
    out_dir: Path,
    stem: str,
    measured: dict[str, Any],
) -> dict[str, Any]:
    """py-spy on every API worker under the same load; the measured run's CPU split by part."""
    from benchmarks import profile

    pids = running.pids_of(API_SERVICE)
    if not pids:
        raise PeerError(f"no {API_SERVICE} worker to profile")
    outcome: dict[str, loadgen.LoadResult] = {}
    loader = threading.Thread(
        target=lambda: outcome.setdefault("load", load(concurrency=concurrency, duration_s=duration_s + 2))
    )
    loader.start()
    time.sleep(1)
    collapsed = profile.record(pids, duration_s=duration_s, out_dir=out_dir, stem=stem)
    loader.join()
    # The measured run's API CPU per request, summed over the API workers, split by the
    # shares of all the workers' samples together.
    api_us = measured["cpu_us_per_request"].get(API_SERVICE, 0.0)
    result = profile.breakdown(
        collapsed, cpu_us_per_request=api_us, rows_per_request=measured["rows_per_request"]
    )
    done = outcome.get("load")
    result["api_workers"] = measured["processes"].get(API_SERVICE, 1)
    result["answered_requests"] = 0 if done is None else done.requests - done.errors["status"]
    return result


def run_benchmark(config: BenchConfig) -> Path:
    """Run every peer on every model; the directory holding bench.json/md/png."""
    started = datetime.now(UTC)
    out_dir = config.out_dir or RESULTS_DIR / started.strftime("%Y%m%dT%H%M%SZ")
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = out_dir / "logs"
    logs.mkdir(exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="flood-bench-home-"))
    result: dict[str, Any] = {
        "meta": {
            "started_at": started.isoformat(timespec="seconds"),
            "smoke": config.smoke,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
            "duration_s": config.duration_s,
            "warmup_s": config.warmup_s,
            "batch_rows": config.batch_rows,
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "machine": machine_facts(),
            "packages": package_versions(),
            "wrk": wrk_version(),
        },
        "models": {},
        "inprocess": {},
        "peers": {},
        "runs": [],
    }
    running: RunningPeer | None = None
    try:
        with scratch_postgres_database(config.postgres_url, prefix="flood_bench") as database_url:
            env = stack_environment(config, home=home, database_url=database_url, secret=uuid.uuid4().hex * 2)
            os.environ.update(env)
            get_settings.cache_clear()
            settings = get_settings()
            from ops.migrations import upgrade_database

            upgrade_database(database_url)
            api_key = create_bench_key(settings)
            models: dict[str, BenchModel] = {}
            for kind in config.models:
                trained = (
                    train_real(settings, trees=config.real_trees)
                    if kind == "real"
                    else train_stress(config.stress)
                )
                models[kind] = register_and_build(kind, trained, settings=settings, workdir=home)
                result["models"][kind] = models[kind].as_dict()
                result["inprocess"][kind] = measure_inprocess(
                    models[kind], budget_s=config.inprocess_budget_s
                )
            specs = peer_specs(config)
            for name, spec in specs.items():
                result["peers"][name] = {
                    "label": spec.label,
                    "config": {
                        **spec.workers,
                        **({} if spec.batching is None else {"batching": spec.batching}),
                    },
                    "status": "ok",
                    "checks": {},
                }
            if "bento-nobatch" in specs and not batching_switch_available():
                result["peers"]["bento-nobatch"].update(
                    status="pending",
                    reason=f"serving has no {BATCHING_SETTING} setting to turn batching off",
                )
            for kind, model in models.items():
                for name, spec in specs.items():
                    peer = result["peers"][name]
                    if peer["status"] == "pending":
                        continue
                    workdir = home / "wrk" / f"{kind}-{name}"
                    workdir.mkdir(parents=True, exist_ok=True)
                    logged_before = count_logged(database_url)
                    try:
                        running = start_peer(
                            spec, model, settings=settings, extra_env=env, log=logs / f"{kind}-{name}.log"
                        )
                        runs, facts = measure_peer(
                            running, kind, config=config, workdir=workdir,
                            api_key=api_key if spec.uses_key else None, logs=logs,
                        )  # fmt: skip
                        facts["worker_processes"] = len(running.worker_pids())
                    except (PeerError, loadgen.LoadError) as exc:
                        logger.error("%s on %s failed: %s", name, kind, exc)
                        peer.update(status="failed", reason=str(exc)[-1500:])
                        continue
                    finally:
                        if running is not None:
                            stop_peer(running)
                            running = None
                    facts["prediction_log_rows"] = count_logged(database_url) - logged_before
                    peer["checks"][kind] = facts
                    result["runs"].extend(runs)
    finally:
        if running is not None:
            stop_peer(running)
        from ops.database import dispose_engines

        dispose_engines()
        if config.keep_home:
            logger.info("FLOOD_HOME kept at %s", home)
        else:
            shutil.rmtree(home, ignore_errors=True)
    result["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["meta"]["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["ratios"] = compute_ratios(result["runs"])
    result["goals"] = judge_goals(result["runs"], result["ratios"])
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    markdown = render_markdown(result)
    (out_dir / "bench.md").write_text(markdown)
    if result["runs"]:
        plot_results(result, out_dir / "bench.png")
    latest = RESULTS_DIR / "latest"
    if out_dir.parent == RESULTS_DIR:
        latest.unlink(missing_ok=True)
        latest.symlink_to(out_dir.name)
    print(markdown)
    return out_dir


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="seconds-long run with tiny numbers (CI)")
    parser.add_argument("--duration", type=float, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per peer and route")
    parser.add_argument("--concurrency", help="comma-separated, e.g. 1,16,64")
    parser.add_argument("--batch-rows", type=int)
    parser.add_argument("--models", help="real,stress")
    parser.add_argument("--peers", help=",".join(PEER_NAMES))
    parser.add_argument("--routes", help="single,batch")
    parser.add_argument("--real-trees", type=int)
    parser.add_argument("--api-workers", type=int)
    parser.add_argument("--model-workers", type=int)
    parser.add_argument("--bento-config", type=json.loads, help="BentoML config overrides (JSON)")
    parser.add_argument("--mlflow-workers", type=int)
    parser.add_argument("--ceiling-workers", type=int)
    parser.add_argument("--postgres-url")
    parser.add_argument("--redis-url")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep-home", action="store_true", help="keep the registry and Bentos")
    parser.add_argument("--profile", type=float, help="seconds of py-spy per profiled peer and route; 0: off")
    args = parser.parse_args(argv)
    config = SMOKE if args.smoke else BenchConfig()
    overrides: dict[str, Any] = {
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "batch_rows": args.batch_rows,
        "real_trees": args.real_trees,
        "api_workers": args.api_workers,
        "model_workers": args.model_workers,
        "bento_config": args.bento_config,
        "mlflow_workers": args.mlflow_workers,
        "ceiling_workers": args.ceiling_workers,
        "postgres_url": args.postgres_url,
        "redis_url": args.redis_url,
        "out_dir": args.out,
        "keep_home": args.keep_home or None,
        "profile_s": args.profile,
    }
    for name, text in (("concurrencies", args.concurrency), ("models", args.models),
                       ("peers", args.peers), ("routes", args.routes)):  # fmt: skip
        if text:
            items = [s.strip() for s in text.split(",") if s.strip()]
            overrides[name] = tuple(int(s) for s in items) if name == "concurrencies" else tuple(items)
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    run_benchmark(parse_args(argv))


if __name__ == "__main__":
    main()
