"""The written selection rule and validation gate, on standings made up to test each clause."""

from __future__ import annotations

import math

import pytest

from training.selection import Standing, judge_validation, select_candidate


def standing(name: str, pr_auc: float, recall: float = 0.5, complexity: int = 3, **kw: object) -> Standing:
    values: dict[str, object] = {"calibration_ratio": 1.0, "monotone": True, "complete": True, **kw}
    return Standing(name=name, complexity=complexity, pr_auc=pr_auc, recall_alert=recall, **values)  # type: ignore[arg-type]


def test_best_pr_auc_wins_outside_the_tie_band() -> None:
    chosen = select_candidate([standing("a", 0.30), standing("b", 0.25, recall=0.9)])
    assert chosen.winner == "a"
    assert chosen.margin == pytest.approx(0.05)


def test_inside_the_tie_band_recall_then_simplicity_decide() -> None:
    by_recall = select_candidate([standing("a", 0.30, 0.5), standing("b", 0.29, 0.7)])
    assert by_recall.winner == "b" and set(by_recall.tied) == {"a", "b"}
    by_simplicity = select_candidate(
        [standing("forest", 0.30, 0.6, complexity=5), standing("rule", 0.29, 0.6, complexity=1)]
    )
    assert by_simplicity.winner == "rule"


def test_ineligible_candidates_cannot_win() -> None:
    chosen = select_candidate(
        [
            standing("inverted", 0.9, monotone=False),
            standing("overconfident", 0.8, calibration_ratio=3.0),
            standing("partial", 0.7, complete=False),
            standing("honest", 0.2),
        ]
    )
    assert chosen.winner == "honest"
    assert set(chosen.ineligible) == {"inverted", "overconfident", "partial"}
    with pytest.raises(ValueError, match="no eligible candidate"):
        select_candidate([standing("inverted", 0.9, monotone=False)])


def test_gate_passes_the_picked_rule_and_models_that_beat_it() -> None:
    rule = standing("rule_1d", 0.10)
    ok, reason = judge_validation(
        rule, is_picked_rule=True, rule_name="rule_1d", rule_pr_auc=0.10, prevalence=0.02
    )
    assert ok, reason
    better = standing("forest", 0.12)
    ok, _ = judge_validation(
        better, is_picked_rule=False, rule_name="rule_1d", rule_pr_auc=0.10, prevalence=0.02
    )
    assert ok


def test_gate_fails_what_does_not_beat_the_rule_or_chance() -> None:
    worse = standing("forest", 0.08)
    ok, reason = judge_validation(
        worse, is_picked_rule=False, rule_name="rule_1d", rule_pr_auc=0.10, prevalence=0.02
    )
    assert not ok and "does NOT beat the rule" in reason
    weak_rule = standing("rule_1d", 0.03)
    ok, reason = judge_validation(
        weak_rule, is_picked_rule=True, rule_name="rule_1d", rule_pr_auc=0.03, prevalence=0.02
    )
    assert not ok and "x the flood rate" in reason
    assert math.isnan(select_candidate([standing("only", 0.5)]).margin)


def test_the_field_is_what_the_gate_passes_when_anything_does() -> None:
    """Amendment 1: a tied candidate with more recall cannot win if the gate fails it."""

    def gate(s: Standing) -> tuple[bool, str]:
        return judge_validation(
            s, is_picked_rule=s.name == "rule_1d", rule_name="rule_1d", rule_pr_auc=0.051, prevalence=0.0156
        )

    standings = [
        standing("rule_1d", 0.055, recall=0.55, complexity=1),
        standing("forest_small", 0.047, recall=0.61, complexity=3),
    ]
    assert select_candidate(standings).winner == "forest_small"  # rules 1-3 alone
    chosen = select_candidate(standings, gate=gate)
    assert chosen.winner == "rule_1d" and chosen.passing == ("rule_1d",)
    assert "pass the gate" in chosen.explanation

    # Nothing passes (the rule itself is below chance): the ranking of rules 1-3 stands,
    # and the explanation says the version fails.
    weak = [standing("rule_1d", 0.02, recall=0.2, complexity=1), standing("forest_small", 0.025, recall=0.3)]
    fallback = select_candidate(weak, gate=gate)
    assert fallback.winner == "forest_small" and fallback.passing == ()
    assert "fails validation" in fallback.explanation
