"""``flood train``: load data (or synthesise it), evaluate, fit, and optionally register."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console

from core.settings import get_settings
from training.budget import ALERT_BUDGET, CRITICAL_BUDGET

logger = logging.getLogger(__name__)


def train_command(
    data: Path | None = typer.Option(
        None, "--data", help="Data folder laid out like ../shared/data (default: FLOOD_DATA_DIR)."
    ),
    register: bool = typer.Option(False, "--register", help="Log to MLflow and register a version."),
    n_estimators: int = typer.Option(
        300, "--trees", min=10, max=2000, help="Trees in the forest candidates."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed for the forest (and synthetic data)."),
    synthetic: bool = typer.Option(False, "--synthetic", help="Use generated data even if real data exists."),
    promote: bool = typer.Option(
        False, "--promote", help="Make the new version champion (implies --register)."
    ),
    allow_synthetic: bool = typer.Option(
        False, "--allow-synthetic", help="With --promote: allow a synthetic-data model (never in production)."
    ),
    allow_failed: bool = typer.Option(
        False, "--allow-failed", help="With --promote: allow a validation-failed model (never in production)."
    ),
    alert_budget: float = typer.Option(
        ALERT_BUDGET,
        "--alert-budget",
        min=0.001,
        max=0.5,
        help="Alert on at most this share of station-days.",
    ),
    critical_budget: float = typer.Option(
        CRITICAL_BUDGET, "--critical-budget", min=0.0005, max=0.2, help="The same for Critical (smaller)."
    ),
    bento: bool = typer.Option(
        False, "--bento", help="Build the new version's Bento (implies --register); before --promote."
    ),
) -> None:
    """Train every candidate, pick one by the written rule, print the leaderboard."""
    # Here, not at the top: `flood --help` and the other commands should not load sklearn.
    from training.data import has_real_data, load_dataset
    from training.pipeline import train_model
    from training.synthetic import generate_dataset

    settings = get_settings()
    data_dir = data or settings.flood_data_dir
    console = Console(stderr=True)
    if not critical_budget < alert_budget:
        raise typer.BadParameter("must be smaller than --alert-budget", param_hint="--critical-budget")
    if data is not None and not has_real_data(data):
        raise typer.BadParameter(f"{data} has no pagasa/*.csv and flood_days.csv", param_hint="--data")
    if synthetic or not has_real_data(data_dir):
        if not synthetic:
            logger.warning("no real data at %s: training on SYNTHETIC data (cannot be promoted "
                           "to production)", data_dir)  # fmt: skip
        dataset = generate_dataset(seed=seed)
    else:
        dataset = load_dataset(data_dir)

    with console.status("training") as status:
        result = train_model(
            dataset,
            n_estimators=n_estimators,
            seed=seed,
            reports_dir=settings.reports_dir,
            alert_budget=alert_budget,
            critical_budget=critical_budget,
            on_step=lambda step: status.update(f"training: {step}"),
        )
    typer.echo(result.report_markdown)
    if register or promote or bento:
        from registry import check_promotable, log_training_run, promote_version

        info = log_training_run(result)
        typer.echo(f"registered {settings.flood_model_name} version {info.version} "
                   f"(run {info.run_id}, data_source={info.data_source})")  # fmt: skip
        if promote:
            # Refuse before building: a Bento for a version that cannot serve is wasted work.
            check_promotable(info, allow_synthetic=allow_synthetic, allow_failed=allow_failed)
        if bento:
            from cli.bento import build_version_bento

            # Built before the alias moves, so the champion always has a Bento to serve.
            typer.echo(f"built {build_version_bento(info.version)} for version {info.version}")
        if promote:
            # Only synthetic models need the flag: a real-data model goes through the same
            # checks as `flood models promote`.
            info = promote_version(info.version, allow_synthetic=allow_synthetic, allow_failed=allow_failed)
            typer.echo(f"promoted version {info.version} to champion")
