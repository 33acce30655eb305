"""The alert budgets: the share of station-days each risk level may flag (``flood train``).

An alert that fires every other day is ignored; these bound how often Alert and Critical
may fire on years the model did not see (``training.evaluation.choose_thresholds``).
"""

from __future__ import annotations

ALERT_BUDGET = 0.15
CRITICAL_BUDGET = 0.03
