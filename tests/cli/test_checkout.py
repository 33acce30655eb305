"""The operator's loop as a user runs it: in a fresh checkout, default ``./.flood`` inside it.

Tests elsewhere use a FLOOD_HOME outside the source tree, which hid that every second
``flood bento build`` in a checkout failed: BentoML's store under ``./.flood`` was copied
into each new Bento until its paths grew too long.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.settings import get_settings

pytestmark = pytest.mark.slow

PROJECT_DIR = Path(__file__).resolve().parents[2]


def fresh_checkout(dest: Path) -> Path:
    """The files a clone of this tree would hold (tracked and not ignored), nothing else."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=PROJECT_DIR,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = PROJECT_DIR / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def flood(checkout: Path, *args: str) -> str:
    """``flood ARGS`` from the checkout's own sources, with no FLOOD_HOME set."""
    unset = ("FLOOD_HOME", "BENTOML_HOME", "MLFLOW_TRACKING_URI")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"flood {' '.join(args)} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def test_builds_twice_and_serves_the_champion_after_rollback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkout = fresh_checkout(tmp_path / "checkout")
    train = ("train", "--synthetic", "--register", "--bento", "--promote", "--allow-synthetic")
    flood(checkout, *train, "--seed", "0")
    flood(checkout, "bento", "build")  # the second build in this checkout, champion v1
    flood(checkout, *train, "--seed", "1")  # v2: Bento built, then promoted
    flood(checkout, "models", "rollback")

    home = checkout / ".flood"
    bentos_dir = home / "bentoml" / "bentos"
    built = sorted(p for p in bentos_dir.glob("flood_risk/*") if p.is_dir())
    assert len(built) == 3
    for bento in built:
        src = bento / "src"
        stray = [p for p in src.rglob("*") if {".flood", "tests"} & set(p.relative_to(src).parts)]
        assert not stray, f"{bento.name} carries checkout state: {stray[:3]}"
        build_code = {"training", "bundle"} & {p.name for p in src.iterdir()}
        assert not build_code, f"{bento.name} carries build-time code: {sorted(build_code)}"
        assert (bento / "src" / "service.py").is_file()

    from bundle.bentos import find_bento, list_bentos

    monkeypatch.setenv("FLOOD_HOME", str(home))
    get_settings.cache_clear()
    settings = get_settings()
    bentos = list_bentos(settings)
    assert [b.model_version for b in bentos] == [2, 1, 1]  # newest first
    champion = find_bento(None, settings=settings)
    # The newest Bento serves v2, which was rolled away from; no tag means the champion's.
    assert champion.model_version == 1
    assert champion.tag == bentos[1].tag
