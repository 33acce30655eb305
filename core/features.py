"""Derived features, computed inside the saved scikit-learn Pipeline.

The model is fitted on the raw observation fields (``core.observation.FIELD_NAMES``) and
this transformer derives everything else, so training and serving run the same code.

Missing optional fields are handled one way, here, for both:
- ``rainfall_3d`` missing -> the day's rainfall (no antecedent rain known);
  ``rainfall_7d`` missing -> ``rainfall_3d``. Sums are also raised to at least the
  shorter window, since they include it.
- ``wind_speed`` missing -> the median seen in training (learned in ``fit``).
- ``month`` missing -> the centre of the month circle (sin = cos = 0) and a wet-season
  flag of 0.5: "season unknown", not "January".

Every feature is derived; a ``FeatureBuilder(features=...)`` passes on the subset a model
family uses (``ALL_FEATURES`` names them all, ``FEATURE_NAMES`` is the default set).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin

from core.observation import FIELD_NAMES

FEATURE_NAMES: tuple[str, ...] = (
    "rainfall",
    "rainfall_3d",
    "rainfall_7d",
    "rain_humidity",
    "humidity",
    "temperature",
    "wind_speed",
    "month_sin",
    "month_cos",
    "wet_season",
)
# log1p of the rain sums: rain is heavy-tailed, and a logistic model is linear in these.
LOG_RAIN_FEATURES: tuple[str, ...] = ("log_rainfall", "log_rainfall_3d", "log_rainfall_7d")
ALL_FEATURES: tuple[str, ...] = (*FEATURE_NAMES, *LOG_RAIN_FEATURES)
# Features through which rain enters; tree models are constrained to be non-decreasing in
# them, which is what makes "more rain never lowers risk" hold by construction.
RAIN_FEATURES: frozenset[str] = frozenset(
    {"rainfall", "rainfall_3d", "rainfall_7d", "rain_humidity", *LOG_RAIN_FEATURES}
)


def monotonic_cst(features: tuple[str, ...]) -> list[int]:
    """+1 (non-decreasing) for each rain feature, 0 (free) for the others."""
    return [1 if name in RAIN_FEATURES else 0 for name in features]


MONOTONIC_CST: tuple[int, ...] = tuple(monotonic_cst(FEATURE_NAMES))

# Southwest monsoon (habagat) and typhoon season over Metro Manila.
WET_MONTHS = frozenset({6, 7, 8, 9, 10, 11})
_COL = {name: i for i, name in enumerate(FIELD_NAMES)}


def to_raw_matrix(rows: pd.DataFrame | np.ndarray | list[dict[str, Any]]) -> np.ndarray:
    """Raw fields as a float matrix in ``FIELD_NAMES`` order; absent optionals become NaN."""
    if isinstance(rows, np.ndarray):
        matrix = np.asarray(rows, dtype=np.float64)
        if matrix.ndim != 2 or matrix.shape[1] != len(FIELD_NAMES):
            raise ValueError(f"expected an (n, {len(FIELD_NAMES)}) matrix of {FIELD_NAMES}")
        return matrix
    frame = pd.DataFrame(rows) if isinstance(rows, list) else rows
    unknown = sorted(set(frame.columns) - set(FIELD_NAMES))
    if unknown:
        raise ValueError(f"unknown input columns: {unknown}")
    out = np.full((len(frame), len(FIELD_NAMES)), np.nan, dtype=np.float64)
    for name in frame.columns:
        out[:, _COL[name]] = pd.to_numeric(frame[name], errors="coerce").to_numpy(np.float64)
    return out


def derive_features(raw: np.ndarray, *, wind_speed_fill: float) -> np.ndarray:
    """Feature matrix (columns ``ALL_FEATURES``) from a raw matrix (columns ``FIELD_NAMES``)."""
    temperature = raw[:, _COL["temperature"]]
    humidity = raw[:, _COL["humidity"]]
    rainfall = raw[:, _COL["rainfall"]]
    rain3 = np.where(np.isnan(raw[:, _COL["rainfall_3d"]]), rainfall, raw[:, _COL["rainfall_3d"]])
    rain3 = np.maximum(rain3, rainfall)
    rain7 = np.where(np.isnan(raw[:, _COL["rainfall_7d"]]), rain3, raw[:, _COL["rainfall_7d"]])
    rain7 = np.maximum(rain7, rain3)
    wind = np.where(np.isnan(raw[:, _COL["wind_speed"]]), wind_speed_fill, raw[:, _COL["wind_speed"]])
    month = raw[:, _COL["month"]]
    known = ~np.isnan(month)
    angle = np.where(known, 2.0 * np.pi * (np.nan_to_num(month) - 1.0) / 12.0, 0.0)
    month_sin = np.where(known, np.sin(angle), 0.0)
    month_cos = np.where(known, np.cos(angle), 0.0)
    wet = np.where(known, np.isin(np.nan_to_num(month), list(WET_MONTHS)).astype(np.float64), 0.5)
    return np.column_stack(
        [
            rainfall,
            rain3,
            rain7,
            rainfall * humidity / 100.0,
            humidity,
            temperature,
            wind,
            month_sin,
            month_cos,
            wet,
            np.log1p(rainfall),
            np.log1p(rain3),
            np.log1p(rain7),
        ]
    )


_FEATURE_INDEX = {name: i for i, name in enumerate(ALL_FEATURES)}


# scikit-learn ships no type information, so its base classes are Any to mypy.
class FeatureBuilder(TransformerMixin, BaseEstimator):  # type: ignore[misc]
    """Raw observation fields -> model features (see the module docstring for missing values).

    ``features``: the derived features to pass on, in this order (default ``FEATURE_NAMES``).
    """

    def __init__(self, features: tuple[str, ...] | None = None) -> None:
        self.features = features

    @property
    def selected(self) -> tuple[str, ...]:
        # getattr: pipelines saved before ``features`` existed carry no such attribute.
        return tuple(getattr(self, "features", None) or FEATURE_NAMES)

    def fit(self, X: Any, y: Any = None) -> FeatureBuilder:  # noqa: N803 - sklearn convention
        raw = to_raw_matrix(X)
        wind = raw[:, _COL["wind_speed"]]
        observed = wind[~np.isnan(wind)]
        self.wind_speed_fill_ = float(np.median(observed)) if observed.size else 0.0
        self.n_features_in_ = len(FIELD_NAMES)
        unknown = sorted(set(self.selected) - set(ALL_FEATURES))
        if unknown:
            raise ValueError(f"unknown features {unknown}; known: {ALL_FEATURES}")
        return self

    def transform(self, X: Any) -> np.ndarray:  # noqa: N803 - sklearn convention
        derived = derive_features(to_raw_matrix(X), wind_speed_fill=self.wind_speed_fill_)
        selected = self.selected
        if selected == ALL_FEATURES:
            return derived
        return derived[:, [_FEATURE_INDEX[name] for name in selected]]

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        return np.asarray(self.selected, dtype=object)
