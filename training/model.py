"""The candidate model families, each a Pipeline of the same two steps.

- ``features``: ``core.features.FeatureBuilder`` passing on the family's features;
- ``model``: the family's classifier, whose P(flood) must be a frequency. Families fitted
  with a proper scoring rule on unweighted classes (logistic, boosting, the rules) or
  averaging leaf frequencies (the small forest) give one as they are. The v1 forest
  balances its classes (P = 0.29 where floods happen on 1.6 % of days), so it alone is
  recalibrated: ``CalibratedClassifierCV(method="sigmoid", ensemble=False)`` over contiguous
  time blocks (``KFold`` without shuffling on rows sorted by date), the sigmoid fitted on
  scores each block got from a fit that never saw it.

Recalibrating every family that way was tried first and dropped: with 4-7 flood days in a
training year, a block holding most of them is scored by a fit that saw one or two, and
the sigmoid learnt a negative slope, turning the rules' ranking upside down (the
behavioural check in ``training.selection`` caught it).

``n_jobs=1`` everywhere: the service runs one model per worker process and parallelism
comes from workers and batching, not from threads fighting over two cores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sklearn.base import ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from sklearn.pipeline import Pipeline

from core.features import FEATURE_NAMES, FeatureBuilder, monotonic_cst

# Time blocks for recalibration: about two months each on one labelled year, four on two.
CALIBRATION_BLOCKS = 6
ANTECEDENT_FEATURES = ("rainfall", "rainfall_3d", "rainfall_7d")
LOG_SUMS = ("log_rainfall", "log_rainfall_3d", "log_rainfall_7d")
RULE_WINDOWS = {"rule_1d": "log_rainfall", "rule_3d": "log_rainfall_3d", "rule_7d": "log_rainfall_7d"}


@dataclass(frozen=True)
class Candidate:
    """One model family under the common protocol."""

    name: str
    description: str
    complexity: int  # ties in selection go to the lower number: the simpler model
    features: tuple[str, ...]
    make_estimator: Callable[[int, int], ClassifierMixin]  # (n_estimators, seed) -> unfitted
    recalibrate: bool = False  # sigmoid over time blocks, for families with reweighted classes

    def build(self, *, n_estimators: int = 300, seed: int = 0) -> Pipeline:
        """An unfitted Pipeline taking the raw observation fields."""
        model = self.make_estimator(n_estimators, seed)
        if self.recalibrate:
            model = CalibratedClassifierCV(
                model,
                method="sigmoid",
                cv=KFold(n_splits=CALIBRATION_BLOCKS, shuffle=False),
                ensemble=False,
            )
        return Pipeline([("features", FeatureBuilder(features=self.features)), ("model", model)])


def _forest(n_estimators: int, seed: int) -> RandomForestClassifier:
    # The forest served before candidates existed: balanced bootstrap classes, small leaves.
    return RandomForestClassifier(
        n_estimators=n_estimators,
        min_samples_leaf=3,
        max_features="sqrt",
        class_weight="balanced_subsample",
        monotonic_cst=monotonic_cst(FEATURE_NAMES),
        n_jobs=1,
        random_state=seed,
    )


def _small_forest(n_estimators: int, seed: int) -> RandomForestClassifier:
    # Leaves of 50 station-days cannot memorise a flood day (3 rows each); one feature per
    # split keeps the trees different from one another.
    return RandomForestClassifier(
        n_estimators=max(10, n_estimators // 2),
        min_samples_leaf=50,
        max_features=1,
        monotonic_cst=monotonic_cst(ANTECEDENT_FEATURES),
        n_jobs=1,
        random_state=seed,
    )


def _logistic(n_estimators: int, seed: int) -> LogisticRegression:
    return LogisticRegression(C=1.0, max_iter=1000)


def _monotone_boosting(n_estimators: int, seed: int) -> HistGradientBoostingClassifier:
    return HistGradientBoostingClassifier(
        learning_rate=0.05,
        max_iter=100,
        max_depth=3,
        min_samples_leaf=40,
        l2_regularization=1.0,
        monotonic_cst=monotonic_cst(FEATURE_NAMES),
        early_stopping=False,
        random_state=seed,
    )


CANDIDATES: tuple[Candidate, ...] = (
    *(
        Candidate(
            name=name,
            description=f"rainfall rule: logistic on {feature} alone",
            complexity=1,
            features=(feature,),
            make_estimator=_logistic,
        )
        for name, feature in RULE_WINDOWS.items()
    ),
    Candidate("logistic", "logistic regression on log rain sums", 2, LOG_SUMS, _logistic),
    Candidate(
        "forest_small",
        "low-capacity forest on antecedent rain (leaves >= 50, 1 feature per split)",
        3,
        ANTECEDENT_FEATURES,
        _small_forest,
    ),
    Candidate(
        "boosting_monotone",
        "gradient boosting, monotone in rain (depth 3, leaves >= 40)",
        4,
        FEATURE_NAMES,
        _monotone_boosting,
    ),
    Candidate(
        "forest",
        "random forest, balanced classes, all features (the v1 model), recalibrated",
        5,
        FEATURE_NAMES,
        _forest,
        recalibrate=True,
    ),
)
CANDIDATE_NAMES: tuple[str, ...] = tuple(c.name for c in CANDIDATES)


def get_candidate(name: str) -> Candidate:
    for candidate in CANDIDATES:
        if candidate.name == name:
            return candidate
    raise KeyError(f"no candidate {name!r}; known: {', '.join(CANDIDATE_NAMES)}")


def build_pipeline(*, n_estimators: int = 300, seed: int = 0, candidate: str = "forest") -> Pipeline:
    """An unfitted Pipeline of one candidate (default: the forest)."""
    return get_candidate(candidate).build(n_estimators=n_estimators, seed=seed)
