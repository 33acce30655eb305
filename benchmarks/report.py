"""The benchmark's outputs: ratios and goals computed from the runs, a Markdown table, a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

OURS = "bento"
MLFLOW = "mlflow"
CEILING = "ceiling"
GOAL_CONCURRENCY = 64
GOALS = {
    "single_vs_mlflow_min": 25.0,
    "single_vs_ceiling_min": 0.3,  # stretch: 0.5
    "single_p99_ms_max": 100.0,
    "single_errors_max": 0,
    "batch_rows_per_s_min": 50_000.0,
    "log_us_per_row_max": 5.0,  # the prediction log's CPU in the API workers, batch route
}


def good_throughput(run: dict[str, Any]) -> float:
    """Successful requests per second (single route) or rows per second (batch route)."""
    if run["route"] == "batch":
        return float(run["rows_per_s"])
    ok = run["requests"] - run["errors"].get("status", 0)
    return ok / run["duration_s"] if run["duration_s"] else 0.0


def _index(runs: list[dict[str, Any]]) -> dict[tuple[str, str, str, int], dict[str, Any]]:
    return {(r["model"], r["peer"], r["route"], r["concurrency"]): r for r in runs}


def compute_ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each peer against mlflow and against the ceiling, same model, route and concurrency."""
    by_key = _index(runs)
    ratios = []
    for (model, peer, route, concurrency), run in sorted(by_key.items()):
        mine = good_throughput(run)
        row: dict[str, Any] = {"model": model, "peer": peer, "route": route, "concurrency": concurrency}
        for other, name in ((MLFLOW, "vs_mlflow"), (CEILING, "vs_ceiling")):
            ref = by_key.get((model, other, route, concurrency))
            base = good_throughput(ref) if ref else 0.0
            row[name] = round(mine / base, 3) if base > 0 else None
        ratios.append(row)
    return ratios


def judge_goals(runs: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals for our Bento at concurrency 64, per model; None when not measured."""
    by_key = _index(runs)
    ratio_of = {(r["model"], r["peer"], r["route"], r["concurrency"]): r for r in ratios}
    out: dict[str, Any] = {}
    for model in sorted({r["model"] for r in runs}):
        single = by_key.get((model, OURS, "single", GOAL_CONCURRENCY))
        batch_runs = [r for r in runs if r["model"] == model and r["peer"] == OURS and r["route"] == "batch"]
        ratio = ratio_of.get((model, OURS, "single", GOAL_CONCURRENCY), {})
        best_batch = max((good_throughput(r) for r in batch_runs), default=None)
        profiled = [r["profile"] for r in batch_runs if r.get("profile")]
        log_us = profiled[-1]["log_us_per_row"] if profiled else None
        checks: dict[str, Any] = {
            "single_vs_mlflow": ratio.get("vs_mlflow"),
            "single_vs_ceiling": ratio.get("vs_ceiling"),
            "single_p99_ms": single["latency_ms"]["p99"] if single else None,
            "single_errors": single["error_count"] if single else None,
            "batch_rows_per_s_best": round(best_batch, 1) if best_batch is not None else None,
            "log_us_per_row": log_us,
        }
        met = {
            "single_vs_mlflow": _at_least(checks["single_vs_mlflow"], GOALS["single_vs_mlflow_min"]),
            "single_vs_ceiling": _at_least(checks["single_vs_ceiling"], GOALS["single_vs_ceiling_min"]),
            "single_p99_ms": _at_most(checks["single_p99_ms"], GOALS["single_p99_ms_max"]),
            "single_errors": _at_most(checks["single_errors"], GOALS["single_errors_max"]),
            "batch_rows_per_s_best": _at_least(
                checks["batch_rows_per_s_best"], GOALS["batch_rows_per_s_min"]
            ),
            "log_us_per_row": _at_most(checks["log_us_per_row"], GOALS["log_us_per_row_max"]),
        }
        out[model] = {"values": checks, "met": met}
    return out


def _at_least(value: float | None, goal: float) -> bool | None:
    return None if value is None else value >= goal


def _at_most(value: float | None, goal: float) -> bool | None:
    return None if value is None else value <= goal


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "–" if value is None else format(value, spec)


def render_markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"# Benchmark {meta['started_at']}{' (smoke)' if meta['smoke'] else ''}",
        "",
        f"Machine: {meta['machine']['cpu']} × {meta['machine']['cores']} cores, "
        f"{meta['machine']['memory_gib']} GiB; load average at start {meta['loadavg_start']}, "
        f"at end {meta.get('loadavg_end')}. Load: wrk {meta['wrk']}, {meta['duration_s']} s per run "
        f"after {meta['warmup_s']} s warm-up; batch route = {meta['batch_rows']} rows per request.",
        "",
        "| model | version / family / trees / nodes / depth | engine |",
        "|---|---|---|",
    ]
    for kind, model in result["models"].items():
        facts = model["facts"]
        lines.append(
            f"| {kind} | v{model['version']} ({model['data_source']}) / {facts['family']} / "
            f"{facts['trees']} / {facts['node_count']:,} / {facts['max_depth']} "
            f"(features {facts['features']}) | {model['engine']} |"
        )
    lines += ["", "Peers:", ""]
    for name, peer in result["peers"].items():
        detail = ", ".join(f"{k}={v}" for k, v in peer.get("config", {}).items())
        status = (
            peer["status"] if peer["status"] == "ok" else f"**{peer['status']}**: {peer.get('reason', '')}"
        )
        lines.append(f"- `{name}`: {peer['label']} ({detail}) — {status}")
    concurrencies = sorted({r["concurrency"] for r in result["runs"]}) or [0]
    top = concurrencies[-1]
    header = " | ".join(f"c{c} thr | c{c} p99 ms | c{c} err" for c in concurrencies)
    lines += [
        "",
        "Throughput is successful requests/s (single) or rows/s (batch); err counts wrk errors "
        "(non-2xx, timeouts, socket).",
        "",
        f"| model | route | peer | {header} | ×mlflow @c{top} | ×ceiling @c{top} |",
        "|---|---|---|" + "---|---|---|" * len(concurrencies) + "---|---|",
    ]
    by_key = _index(result["runs"])
    ratio_of = {(r["model"], r["peer"], r["route"], r["concurrency"]): r for r in result["ratios"]}
    for model in result["models"]:
        for route in ("single", "batch"):
            for peer in result["peers"]:
                cells = []
                for c in concurrencies:
                    run = by_key.get((model, peer, route, c))
                    if run is None:
                        cells.append("– | – | –")
                        continue
                    cells.append(
                        f"{good_throughput(run):,.0f} | {run['latency_ms']['p99']:.1f} | {run['error_count']}"
                    )
                if all(c == "– | – | –" for c in cells):
                    continue
                ratio = ratio_of.get((model, peer, route, top), {})
                lines.append(
                    f"| {model} | {route} | {peer} | {' | '.join(cells)} | "
                    f"{_fmt(ratio.get('vs_mlflow'), '.2f')} | {_fmt(ratio.get('vs_ceiling'), '.2f')} |"
                )
    lines += ["", f"Goals for `{OURS}` at c{GOAL_CONCURRENCY}:", ""]
    lines += [
        "| model | ×mlflow ≥25 | ×ceiling ≥0.3 (stretch 0.5) | p99 ≤100 ms | 0 errors "
        "| batch rows/s ≥50,000 (best) | log µs/row ≤5 |"
    ]
    lines += ["|---|---|---|---|---|---|---|"]
    formats = {
        "single_vs_mlflow": ".1f",
        "single_vs_ceiling": ".2f",
        "single_p99_ms": ".1f",
        "single_errors": "d",
        "batch_rows_per_s_best": ",.0f",
        "log_us_per_row": ".2f",
    }
    for model, goal in result["goals"].items():
        cells = []
        for key, spec in formats.items():
            mark = {True: "✅", False: "❌", None: ""}[goal["met"][key]]
            cells.append(f"{_fmt(goal['values'][key], spec)} {mark}".strip())
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += _cpu_lines(result, top)
    lines += _profile_lines(result)
    lines += ["", "In-process cost per call (µs), one thread:", ""]
    lines += ["| model | batch | features | sklearn forest | ONNX Runtime forest | sklearn / ONNX |"]
    lines += ["|---|---|---|---|---|---|"]
    for model, sizes in result["inprocess"].items():
        for size, row in sizes.items():
            onnx = row.get("onnxruntime_us")
            speedup = row["sklearn_us"] / onnx if onnx else None
            lines.append(
                f"| {model} | {size} | {_fmt(row['features_us'], ',.1f')} | "
                f"{_fmt(row['sklearn_us'], ',.1f')} | {_fmt(onnx, ',.1f')} | {_fmt(speedup, '.1f')}× |"
            )
    return "\n".join(lines) + "\n"


def _cpu_lines(result: dict[str, Any], top: int) -> list[str]:
    """CPU per request by process role at the top concurrency, and wrk's own cost."""
    runs = [r for r in result["runs"] if r["concurrency"] == top and r.get("cpu_us_per_request")]
    if not runs:
        return []
    lines = [
        "",
        f"CPU per request at c{top} (µs, summed over a role's processes; processes in brackets), "
        "and wrk: its µs per request and how many times the measured rate its threads could "
        "send at that cost (near 1, wrk would be the bottleneck):",
        "",
        "| model | route | peer | per role | total | wrk µs/req | wrk headroom |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        roles = ", ".join(
            f"{role} {us:,.0f} ({run['processes'].get(role, '?')})"
            for role, us in run["cpu_us_per_request"].items()
        )
        total = sum(run["cpu_us_per_request"].values())
        lines.append(
            f"| {run['model']} | {run['route']} | {run['peer']} | {roles} | {total:,.0f} | "
            f"{run['wrk_us_per_request']:,.1f} | {run['wrk_headroom']:.1f}× |"
        )
    return lines


def _profile_lines(result: dict[str, Any]) -> list[str]:
    """The API workers' CPU per request split by part, from py-spy."""
    profiled = [r for r in result["runs"] if r.get("profile")]
    if not profiled:
        return []
    lines = [
        "",
        "Where the API workers' CPU per request goes (py-spy samples of every API worker under the "
        "same load, times the measured CPU per request; µs):",
        "",
        "| model | route | peer | API µs/req | parts | log µs/row | samples |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in profiled:
        prof = run["profile"]
        parts = "; ".join(f"{part} {us:,.0f}" for part, us in prof["us_per_request"].items())
        lines.append(
            f"| {run['model']} | {run['route']} | {run['peer']} | {prof['cpu_us_per_request']:,.0f} | "
            f"{parts} | {prof['log_us_per_row']:.2f} | {prof['samples']} |"
        )
    return lines


def plot_results(result: dict[str, Any], path: Path) -> Path:
    """Throughput and p99 against concurrency, per model and route, one line per peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    routes = ("single", "batch")
    fig, axes = plt.subplots(len(models), 4, figsize=(18, 4 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, route in enumerate(routes):
            thr_ax, p99_ax = axes[i][2 * j], axes[i][2 * j + 1]
            for peer in result["peers"]:
                runs = sorted(
                    (
                        r
                        for r in result["runs"]
                        if r["model"] == model and r["peer"] == peer and r["route"] == route
                    ),
                    key=lambda r: r["concurrency"],
                )
                if not runs:
                    continue
                xs = [r["concurrency"] for r in runs]
                thr_ax.plot(xs, [max(good_throughput(r), 1e-3) for r in runs], marker="o", label=peer)
                p99_ax.plot(xs, [max(r["latency_ms"]["p99"], 1e-3) for r in runs], marker="o", label=peer)
            unit = "rows/s" if route == "batch" else "req/s"
            thr_ax.set(title=f"{model}, {route}: throughput", xlabel="concurrency", ylabel=unit, yscale="log")
            p99_ax.set(
                title=f"{model}, {route}: p99 latency", xlabel="concurrency", ylabel="ms", yscale="log"
            )
            for ax in (thr_ax, p99_ax):
                ax.set_xscale("symlog", linthresh=1)
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
