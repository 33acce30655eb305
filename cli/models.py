"""``flood models ...``: look at registered versions and move the champion alias.

Errors (unknown version, no champion, refused promotion) are ``FloodError``s; the console
entry point (``cli.main.run``) prints them as one line on stderr and exits 1.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import typer
from rich import box
from rich.console import Console
from rich.table import Table

import registry

if TYPE_CHECKING:
    from registry import ModelVersionInfo

app = typer.Typer(no_args_is_help=True)

# Shown in `flood models list` (metric -> column); every metric is in `show` and `compare`.
HEADLINE_METRICS = {
    "oof_pr_auc": "PR-AUC",
    "oof_recall_alert": "rec@Alert",
    "oof_precision_alert": "prec@Alert",
}


def _number(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.4f}"


def _expected(rate: float, recall: float) -> str:
    if math.isnan(rate):
        return "-"
    return f"alert rate {rate:.1%} of station-days, recall {recall:.0%} of flood days (out of year)"


def _aliases(info: ModelVersionInfo) -> str:
    return ", ".join(info.aliases) or "-"


@app.command("list")
def list_command() -> None:
    """Every registered version, oldest first."""
    versions = registry.list_versions()
    console = Console()
    if not versions:
        console.print("no registered versions yet (train one with `flood train`)")
        return
    table = Table(
        title=f"{versions[0].name}: registered versions",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
        collapse_padding=True,
    )
    for column in ("ver", "aliases", "data", "valid"):
        table.add_column(column, no_wrap=True)
    for column in HEADLINE_METRICS.values():
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("created UTC", no_wrap=True)
    for info in versions:
        table.add_row(
            str(info.version),
            _aliases(info),
            info.data_source,
            info.validation_status,
            *(_number(info.metrics.get(m)) for m in HEADLINE_METRICS),
            info.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    console.print(table)


@app.command("show")
def show_command(version: int = typer.Argument(..., help="Version number.")) -> None:
    """One version: provenance, thresholds, validation and every metric."""
    info = registry.get_version(version)
    rows = {
        "aliases": _aliases(info),
        "data source": info.data_source,
        "validation": info.validation_status,
        "validation reason": info.validation_reason or "-",
        "candidate": info.candidate or "-",
        "threshold alert": _number(info.thresholds.alert),
        "alert expected": _expected(info.thresholds.alert_rate, info.thresholds.alert_recall),
        "threshold critical": _number(info.thresholds.critical),
        "critical expected": _expected(info.thresholds.critical_rate, info.thresholds.critical_recall),
        "threshold rule": info.thresholds.rule,
        "created (UTC)": info.created_at.isoformat(timespec="seconds"),
        "promoted at (UTC)": info.promoted_at.isoformat(timespec="seconds") if info.promoted_at else "-",
        "run id": info.run_id,
        "source": info.source,
        "model sha256": info.model_sha256,
    }
    # Plain lines, not a table: hashes and ids stay whole for copy-paste on any width.
    typer.echo(f"{info.name} v{info.version}")
    for field, value in rows.items():
        typer.echo(f"  {field + ':':<20} {value}")
    console = Console()
    metrics = Table(title="metrics")
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    for name in sorted(info.metrics):
        metrics.add_row(name, _number(info.metrics[name]))
    console.print(metrics)


# The leaderboard's columns: pooled out-of-year metrics of each candidate.
CANDIDATE_METRICS = {
    "pr_auc": "PR-AUC",
    "roc_auc": "ROC-AUC",
    "brier": "Brier",
    "bss": "BSS",
    "calibration_ratio": "P/rate",
    "alert_rate": "alerts",
    "recall_alert": "rec@Alert",
    "recall_critical": "rec@Crit",
}


@app.command("compare")
def compare_command(
    a: int | None = typer.Argument(None, help="A version (alone: its training run's candidates)."),
    b: int | None = typer.Argument(None, help="Second version: compare the two versions' metrics."),
) -> None:
    """The candidates of a version's training run side by side (default: the newest
    version), or, given two versions, their metrics side by side (delta = B - A)."""
    if b is None:
        _candidates_table(a)
        return
    assert a is not None  # typer fills positional arguments in order
    rows = registry.compare_versions(a, b)
    table = Table(title=f"v{a} vs v{b}")
    table.add_column("metric")
    for column in (f"v{a}", f"v{b}", "delta"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row.metric, _number(row.a), _number(row.b), _number(row.delta))
    Console().print(table)


def _candidates_table(version: int | None) -> None:
    if version is None:
        versions = registry.list_versions()
        if not versions:
            raise typer.BadParameter("no registered versions yet (train one with `flood train`)")
        version = versions[-1].version
    standings = registry.candidate_standings(version)
    console = Console()
    if not standings:
        console.print(f"v{version}'s training run logged no candidates (registered before candidates)")
        return
    table = Table(title=f"v{version}: candidates, pooled out-of-year (* = winner)", box=box.SIMPLE_HEAD)
    table.add_column("candidate", no_wrap=True)
    for column in CANDIDATE_METRICS.values():
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("eligible")
    for s in standings:
        table.add_row(
            ("* " if s.winner else "  ") + s.name,
            *(_short(s.metrics.get(m), digits=4 if m == "brier" else 3) for m in CANDIDATE_METRICS),
            "yes" if s.eligible else f"no: {s.note}",
        )
    # Wide enough for every column even when piped (rich assumes 80 columns then).
    Console(width=max(console.width, 120)).print(table)


def _short(value: float | None, *, digits: int) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


@app.command("promote")
def promote_command(
    version: int = typer.Argument(..., help="Version to make champion."),
    allow_synthetic: bool = typer.Option(
        False, "--allow-synthetic", help="Accept a synthetic-data model (never in production)."
    ),
    allow_failed: bool = typer.Option(
        False, "--allow-failed", help="Accept a validation-failed model (never in production)."
    ),
) -> None:
    """Point the champion alias at VERSION."""
    info = registry.promote_version(version, allow_synthetic=allow_synthetic, allow_failed=allow_failed)
    typer.echo(f"champion: {info.name} v{info.version}{_previous_note('was')}")


def _previous_note(verb: str) -> str:
    last = registry.champion_history()[-1]
    return f" ({verb} v{last.previous})" if last.previous is not None else ""


@app.command("rollback")
def rollback_command() -> None:
    """Move the champion alias back to the previous champion."""
    info = registry.rollback_champion()
    typer.echo(f"champion: {info.name} v{info.version}{_previous_note('rolled back from')}")


@app.command("history")
def history_command() -> None:
    """Every promotion and rollback of the champion alias, oldest first."""
    events = registry.champion_history()
    console = Console()
    if not events:
        console.print("the champion alias has never been set")
        return
    table = Table(title="champion history")
    for column in ("at (UTC)", "action", "version", "previous", "user"):
        table.add_column(column)
    for event in events:
        previous = "-" if event.previous is None else str(event.previous)
        table.add_row(
            event.at.isoformat(timespec="seconds"), event.action, str(event.version), previous, event.user
        )
    console.print(table)
