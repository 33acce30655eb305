"""Risk levels and the thresholds that map P(flood) to them, as stored with a model version.

Shared by training (which chooses the thresholds), the registry (which stores them as tags)
and serving (which applies them), so none of those imports another for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

RiskLevel = Literal["Safe", "Alert", "Critical"]
RISK_LEVELS: tuple[RiskLevel, ...] = ("Safe", "Alert", "Critical")


@dataclass(frozen=True)
class Thresholds:
    """P(flood) cut-offs for the risk levels: Safe < alert <= Alert < critical <= Critical.

    Beside each cut-off, what it is expected to do, measured out of year when it was chosen:
    the share of station-days at or above it (its alert rate) and the share of flood days
    it catches (its recall). NaN where unknown (versions registered before they existed).
    """

    alert: float
    critical: float
    rule: str  # how they were chosen, for people reading the registry
    alert_rate: float = math.nan
    alert_recall: float = math.nan
    critical_rate: float = math.nan
    critical_recall: float = math.nan

    def risk_level(self, probability: float) -> RiskLevel:
        if probability >= self.critical:
            return "Critical"
        if probability >= self.alert:
            return "Alert"
        return "Safe"

    def as_tags(self) -> dict[str, str]:
        return {
            # repr round-trips a float exactly: served risk levels match training's
            "threshold_alert": repr(self.alert),
            "threshold_critical": repr(self.critical),
            "threshold_rule": self.rule,
            **{f"threshold_{name}": repr(getattr(self, name)) for name in _EXPECTED},
        }

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Thresholds:
        return cls(
            alert=float(tags["threshold_alert"]),
            critical=float(tags["threshold_critical"]),
            rule=tags.get("threshold_rule", ""),
            **{name: float(tags.get(f"threshold_{name}", "nan")) for name in _EXPECTED},
        )

    def expected(self) -> dict[str, float]:
        """Each level's out-of-year alert rate and recall (NaN: unknown)."""
        return {name: getattr(self, name) for name in _EXPECTED}

    def __eq__(self, other: object) -> bool:
        # NaN (unknown) equals NaN here: a round trip through tags must compare equal.
        if not isinstance(other, Thresholds):
            return NotImplemented
        return (self.alert, self.critical, self.rule) == (other.alert, other.critical, other.rule) and all(
            _same(getattr(self, n), getattr(other, n)) for n in _EXPECTED
        )

    def __hash__(self) -> int:
        return hash((self.alert, self.critical, self.rule))


_EXPECTED = ("alert_rate", "alert_recall", "critical_rate", "critical_recall")


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))
