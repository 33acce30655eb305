"""``flood models ...`` against a real SQLite registry under the per-test FLOOD_HOME."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import registry
from cli.main import app
from core.settings import Settings
from tests.conftest import run_flood
from tests.registry.training_results import labelled

FLOOD = Path(sys.executable).with_name("flood")


def test_list_show_compare_promote_rollback(settings: Settings) -> None:
    registry.log_training_run(labelled(seed=0))
    registry.log_training_run(labelled(seed=1))
    runner = CliRunner()

    listed = runner.invoke(app, ["models", "list"])
    assert listed.exit_code == 0, listed.output
    rows = [line for line in listed.output.splitlines() if line.strip(" │┃|").startswith(("1 ", "2 "))]
    assert len(rows) == 2

    promoted = runner.invoke(app, ["models", "promote", "1"])
    assert promoted.exit_code == 0, promoted.output
    assert promoted.output.strip() == f"champion: {settings.flood_model_name} v1"
    promoted = runner.invoke(app, ["models", "promote", "2"])
    assert promoted.output.strip() == f"champion: {settings.flood_model_name} v2 (was v1)"

    shown = runner.invoke(app, ["models", "show", "2"])
    assert shown.exit_code == 0, shown.output
    assert registry.get_version(2).model_sha256 in shown.output
    assert "champion" in shown.output

    compared = runner.invoke(app, ["models", "compare", "1", "2"])
    assert compared.exit_code == 0, compared.output
    for metric in registry.get_version(1).metrics:
        assert metric in compared.output

    # One version: its training run's candidates, the winner marked, in the leaderboard's order.
    leaderboard = labelled(seed=0).leaderboard
    candidates = runner.invoke(app, ["models", "compare", "2"])
    assert candidates.exit_code == 0, candidates.output
    table = [line.split() for line in candidates.output.splitlines()]
    known = set(leaderboard["candidate"])
    assert [cell for row in table for cell in row[:2] if cell in known] == list(leaderboard["candidate"])
    winner = leaderboard.loc[leaderboard["winner"], "candidate"].item()
    assert ["*", winner] in [row[:2] for row in table]
    shown = runner.invoke(app, ["models", "show", "2"])
    assert f"candidate:           {winner}" in shown.output
    assert "alert expected:      alert rate" in shown.output

    rolled = runner.invoke(app, ["models", "rollback"])
    assert rolled.exit_code == 0, rolled.output
    assert rolled.output.strip() == f"champion: {settings.flood_model_name} v1 (rolled back from v2)"
    assert registry.resolve_alias().version == 1

    history = runner.invoke(app, ["models", "history"])
    assert history.exit_code == 0, history.output
    assert history.output.count("promote") == 2
    assert history.output.count("rollback") == 1


def test_unknown_version_is_one_line_error(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    registry.log_training_run(labelled())
    capsys.readouterr()
    assert run_flood(["models", "show", "99"], monkeypatch) == 1
    err = capsys.readouterr().err
    assert f"error: model '{settings.flood_model_name}' has no version 99" in err
    assert "Traceback" not in err

    assert run_flood(["models", "promote", "99"], monkeypatch) == 1
    assert "has no version 99" in capsys.readouterr().err


def test_no_champion_yet_is_one_line_error(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_flood(["models", "rollback"], monkeypatch) == 1
    err = capsys.readouterr().err
    assert "error: model 'flood-risk' has no champion yet" in err
    assert "Traceback" not in err


def test_synthetic_promotion_needs_flag(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    registry.log_training_run(labelled(data_source="synthetic"))
    capsys.readouterr()
    assert run_flood(["models", "promote", "1"], monkeypatch) == 1
    err = capsys.readouterr().err
    assert "synthetic" in err and "--allow-synthetic" in err
    assert "Traceback" not in err

    assert run_flood(["models", "promote", "1", "--allow-synthetic"], monkeypatch) == 0
    assert "champion: flood-risk v1" in capsys.readouterr().out


def test_console_script_reports_unknown_version_on_stderr(flood_home: Path) -> None:
    env = {**os.environ, "FLOOD_HOME": str(flood_home), "MLFLOW_DISABLE_TELEMETRY": "true"}
    done = subprocess.run(
        [str(FLOOD), "models", "show", "3"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.strip().splitlines()[-1] == "error: model 'flood-risk' has no version 3"
    assert "Traceback" not in done.stderr


def test_mlflow_ui_opens_the_projects_own_store(settings: Settings) -> None:
    from registry.backend import ui_argv

    argv = ui_argv(host="127.0.0.1", port=5055)
    assert Path(argv[0]).name == "mlflow" and Path(argv[0]).is_file()
    assert argv[argv.index("--backend-store-uri") + 1] == settings.tracking_uri
    assert str(settings.flood_home.resolve()) in settings.tracking_uri
    assert argv[-4:] == ["--host", "127.0.0.1", "--port", "5055"]
