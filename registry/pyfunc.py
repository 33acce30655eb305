"""The MLflow pyfunc wrapper: ``predict(DataFrame of raw fields) -> P(flood)`` per row.

The model is logged "from code": the model directory carries a three-line script
(``MODEL_CODE``) that instantiates ``FloodRiskModel``, so nothing is unpickled on load and
the fitted pipeline itself is read with skops under ``registry.integrity.TRUSTED_TYPES``.

Schema enforcement by MLflow (the logged signature) requires float columns: an ``int64``
column is refused as "cannot safely convert int64 to float64". Cast with ``astype(float)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

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
        probabilities = self.pipeline.predict_proba(model_input)
        flood_column = list(self.pipeline.classes_).index(1)
        return np.asarray(probabilities[:, flood_column], dtype=np.float64)
