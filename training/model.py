"""The estimator: derived features then a monotone, class-balanced random forest."""

from __future__ import annotations

from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import Pipeline

from core.features import MONOTONIC_CST, FeatureBuilder


def build_pipeline(*, n_estimators: int = 300, seed: int = 0, min_samples_leaf: int = 3) -> Pipeline:
    """An unfitted Pipeline taking the raw observation fields.

    ``n_jobs=1`` because the service runs one model per worker process and parallelism comes
    from workers and batching, not from threads fighting over two cores. Classes are
    balanced per bootstrap sample: there are a few dozen flood rows among thousands.
    """
    forest = RandomForestClassifier(
        n_estimators=n_estimators,
        min_samples_leaf=min_samples_leaf,
        max_features="sqrt",
        class_weight="balanced_subsample",
        monotonic_cst=list(MONOTONIC_CST),
        n_jobs=1,
        random_state=seed,
    )
    return Pipeline([("features", FeatureBuilder()), ("model", forest)])
