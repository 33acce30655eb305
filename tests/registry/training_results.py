"""Small trained models for registry tests, built once per test process.

The lead's synthetic dataset is trained once (20 trees); a second pipeline is refitted
with another seed so two versions give distinguishable predictions. Labels that the
promotion rules look at (data source, validation) are set explicitly by each test through
``labelled`` instead of depending on how a synthetic run happens to validate.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from core.observation import FIELD_NAMES
from training.model import build_pipeline
from training.pipeline import train_model
from training.result import TrainingResult
from training.synthetic import generate_dataset

N_ESTIMATORS = 20


@functools.cache
def _trained() -> tuple[TrainingResult, pd.DataFrame]:
    reports = Path(tempfile.mkdtemp(prefix="flood-test-reports-"))
    atexit.register(shutil.rmtree, reports, ignore_errors=True)
    dataset = generate_dataset(seed=0)
    result = train_model(dataset, n_estimators=N_ESTIMATORS, seed=0, reports_dir=reports)
    return result, dataset.table


def labelled(*, seed: int = 0, data_source: str = "real", validation_passed: bool = True) -> TrainingResult:
    """A trained result whose pipeline depends on ``seed`` and with the given labels."""
    base, table = _trained()
    pipeline = base.pipeline
    if seed != 0:
        pipeline = build_pipeline(n_estimators=N_ESTIMATORS, seed=seed).fit(
            table.loc[:, list(FIELD_NAMES)], table["flood"].to_numpy()
        )
    return dataclasses.replace(
        base,
        pipeline=pipeline,
        data_source=data_source,
        validation_passed=validation_passed,
        validation_reason="ok" if validation_passed else "does not beat the rainfall baseline",
    )


def sample_inputs(rows: int = 40) -> pd.DataFrame:
    """Raw input rows, floats, including the wettest days so P(flood) is not all zero."""
    _, table = _trained()
    wet = table.sort_values("rainfall", ascending=False).head(rows // 2)
    rest = table.sample(rows - len(wet), random_state=0)
    return pd.concat([wet, rest]).loc[:, list(FIELD_NAMES)].astype(float).reset_index(drop=True)
