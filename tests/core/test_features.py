from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from core.features import FEATURE_NAMES, MONOTONIC_CST, FeatureBuilder, to_raw_matrix
from core.observation import FIELD_NAMES, INPUT_FIELDS, Observation


def features_of(
    rows: Sequence[Mapping[str, float]], *, fit_rows: Sequence[Mapping[str, float]] | None = None
) -> pd.DataFrame:
    builder = FeatureBuilder().fit(pd.DataFrame(fit_rows or rows))
    return pd.DataFrame(builder.transform(pd.DataFrame(rows)), columns=list(FEATURE_NAMES))


def test_missing_optional_fields_follow_the_documented_rule() -> None:
    fit = [{"temperature": 28, "humidity": 80, "rainfall": 1, "wind_speed": w} for w in (2, 4, 9)]
    out = features_of([{"temperature": 28, "humidity": 80, "rainfall": 12.5}], fit_rows=fit).iloc[0]
    assert out["rainfall_3d"] == 12.5 and out["rainfall_7d"] == 12.5
    assert out["wind_speed"] == 4  # the training median
    assert out["month_sin"] == 0 and out["month_cos"] == 0 and out["wet_season"] == 0.5


def test_sums_are_raised_to_include_the_day() -> None:
    out = features_of([{"temperature": 28, "humidity": 80, "rainfall": 30, "rainfall_3d": 10}]).iloc[0]
    assert out["rainfall_3d"] == 30 and out["rainfall_7d"] == 30


def test_month_encoding_and_wet_season() -> None:
    rows = [{"temperature": 28, "humidity": 80, "rainfall": 0, "month": m} for m in (1, 7)]
    out = features_of(rows)
    assert out.loc[0, "wet_season"] == 0 and out.loc[1, "wet_season"] == 1
    assert out.loc[0, "month_cos"] == pytest.approx(1.0)
    assert out.loc[1, "month_cos"] == pytest.approx(-1.0)


def test_unknown_columns_are_rejected() -> None:
    with pytest.raises(ValueError, match="rain"):
        to_raw_matrix(pd.DataFrame([{"temperature": 1, "humidity": 1, "rain": 3}]))


def test_rain_features_are_the_constrained_ones() -> None:
    constrained = {n for n, c in zip(FEATURE_NAMES, MONOTONIC_CST, strict=True) if c == 1}
    assert constrained == {"rainfall", "rainfall_3d", "rainfall_7d", "rain_humidity"}


def test_observation_schema_matches_field_table() -> None:
    schema = Observation.model_json_schema()
    assert tuple(schema["properties"]) == FIELD_NAMES
    for spec in INPUT_FIELDS:
        prop = schema["properties"][spec.name]
        bounds = prop if "minimum" in prop else prop["anyOf"][0]
        assert (bounds["minimum"], bounds["maximum"]) == (spec.minimum, spec.maximum)
    assert set(schema["required"]) == {"temperature", "humidity", "rainfall"}


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"temperature": 28, "humidity": 85}, "rainfall"),
        ({"temperature": 28, "humidity": 185, "rainfall": 1}, "humidity"),
        ({"temperature": math.nan, "humidity": 85, "rainfall": 1}, "temperature"),
        ({"temperature": 28, "humidity": 85, "rainfall": math.inf}, "rainfall"),
        ({"temperature": 28, "humidity": 85, "rainfall": 1, "rain": 3}, "rain"),
        ({"temperature": 28, "humidity": 85, "rainfall": -1}, "rainfall"),
        ({"temperature": 28, "humidity": 85, "rainfall": 1, "month": 13}, "month"),
    ],
)
def test_observation_rejects_bad_input_naming_the_field(payload: dict[str, float], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        Observation.model_validate(payload)
    assert field in {str(loc) for err in info.value.errors() for loc in err["loc"]}


def test_observation_rejects_sums_smaller_than_the_day() -> None:
    with pytest.raises(ValidationError, match="rainfall_3d must be >= rainfall"):
        Observation(temperature=28, humidity=80, rainfall=50, rainfall_3d=20)
    ok = Observation(temperature=28, humidity=80, rainfall=50, rainfall_3d=60, rainfall_7d=60)
    assert np.isclose(ok.rainfall_7d or 0, 60)
