"""The MLflow pyfunc wrapper: ``predict(DataFrame of raw fields) -> P(flood)`` per row.

The model is logged "from code": the model directory carries a three-line script
(``MODEL_CODE``) that instantiates ``FloodRiskModel``, so nothing is unpickled on load and
the fitted pipeline itself is read with skops under ``registry.integrity.TRUSTED_TYPES``.

The logged signature names the columns and which are required, typed ``Any``: MLflow's own
enforcement of ``double`` refuses an ``int64`` column ("cannot safely convert int64 to
float64"), and people type ``"rainfall": [0, 5, 20]``. ``predict`` converts every column
to float itself and refuses, with the column's name, what is not a number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from core.errors import DataError
from core.observation import FIELD_NAMES, REQUIRED_FIELDS
from registry.integrity import load_pipeline_file

PIPELINE_ARTIFACT = "pipeline"
MODEL_CODE_FILE = "flood_model.py"
MODEL_CODE = (
    "from mlflow.models import set_model\n"
    "from registry.pyfunc import FloodRiskModel\n"
    "set_model(FloodRiskModel())\n"
)


class FloodRiskModel(PythonModel):
    """P(flood) for each row of raw observation fields (``core.observation.FIELD_NAMES``)."""

    def load_context(self, context: Any) -> None:
        self.pipeline = load_pipeline_file(Path(context.artifacts[PIPELINE_ARTIFACT]))

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        probabilities = self.pipeline.predict_proba(numeric_frame(model_input))
        flood_column = list(self.pipeline.classes_).index(1)
        return np.asarray(probabilities[:, flood_column], dtype=np.float64)


def numeric_frame(model_input: Any) -> pd.DataFrame:
    """The input as float columns; ``DataError`` naming unknown, missing or non-numeric ones."""
    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    unknown = sorted(set(map(str, frame.columns)) - set(FIELD_NAMES))
    if unknown:
        raise DataError(f"unknown input columns {unknown}; expected some of {list(FIELD_NAMES)}")
    missing = [name for name in REQUIRED_FIELDS if name not in frame.columns]
    if missing:
        raise DataError(f"missing required input columns {missing}")
    converted = {}
    for name in frame.columns:
        column = frame[name]
        if column.dtype == bool or not (
            pd.api.types.is_numeric_dtype(column) or column.map(_is_number_or_missing).all()
        ):
            raise DataError(f"input column {name!r} must hold numbers, got {column.dtype}")
        converted[name] = pd.to_numeric(column).astype(np.float64)
    return pd.DataFrame(converted, index=frame.index)


def _is_number_or_missing(value: object) -> bool:
    return value is None or (isinstance(value, int | float | np.number) and not isinstance(value, bool))
