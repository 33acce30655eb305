from __future__ import annotations

import pytest

from training.data import Dataset
from training.pipeline import train_model
from training.result import TrainingResult
from training.synthetic import generate_dataset


@pytest.fixture(scope="session")
def synthetic_dataset() -> Dataset:
    return generate_dataset(seed=1)


@pytest.fixture(scope="session")
def synthetic_result(synthetic_dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> TrainingResult:
    return train_model(synthetic_dataset, n_estimators=60, seed=0, reports_dir=tmp_path_factory.mktemp("rep"))
