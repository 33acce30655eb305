"""Fixtures for the reliability tests, and the fault table printed at the end of a session.

Each fault test records one figure (fault, requests, errors, log rows lost, recovery time)
with :func:`record_figure`; figures go to ``$FLOOD_RELIABILITY_REPORT`` (default
``tests/reliability/.results.json``, one JSON object per line) and are printed as a table
after the test summary.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

# Session fixtures of the serving tests (registry versions, Bentos); a name, used by name.
from tests.serving.conftest import built_home, predictor, served_model  # noqa: F401

REPORT_PATH = Path(os.environ.get("FLOOD_RELIABILITY_REPORT", Path(__file__).with_name(".results.json")))
_FIGURES: list[Figure] = []


@dataclass(frozen=True)
class Figure:
    fault: str
    requests: int
    errors: int
    log_rows_lost: int | None
    recovery_s: float | None
    note: str = ""


def record_figure(figure: Figure) -> None:
    _FIGURES.append(figure)
    REPORT_PATH.parent.mkdir(parents=True, exist_ok=True)
    with REPORT_PATH.open("a", encoding="utf-8") as out:
        out.write(json.dumps(asdict(figure)) + "\n")


def format_table(figures: list[Figure]) -> str:
    header = "| fault | requests | errors | log rows lost | recovery (s) | note |"
    lines = [header, "|---|---:|---:|---:|---:|---|"]
    for f in figures:
        lost = "n/a" if f.log_rows_lost is None else str(f.log_rows_lost)
        recovery = "n/a" if f.recovery_s is None else f"{f.recovery_s:.1f}"
        lines.append(f"| {f.fault} | {f.requests} | {f.errors} | {lost} | {recovery} | {f.note} |")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FIGURES:
        terminalreporter.section("reliability figures")
        terminalreporter.write_line(format_table(_FIGURES))
