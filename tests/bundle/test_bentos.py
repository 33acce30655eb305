"""What a Bento is built from: the staged context holds the running service and nothing else."""

from __future__ import annotations

from pathlib import Path

from bundle.bentos import PROJECT_DIR, stage_build_context


def test_the_build_context_holds_the_service_and_no_build_or_checkout_code(tmp_path: Path) -> None:
    context = stage_build_context(PROJECT_DIR, tmp_path / "src")
    staged = [p.relative_to(context) for p in context.rglob("*") if p.is_file()]
    tops = {p.parts[0] for p in staged}
    # Training and packaging run where `flood` runs; the Bento must not carry them.
    assert not tops & {"training", "bundle", "tests", ".flood"}, sorted(tops)
    assert (context / "service.py").is_file()
    for package in ("serving", "ops", "core"):
        assert (context / package / "__init__.py").is_file(), package
