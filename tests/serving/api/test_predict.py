"""The prediction routes' response rows, written without a model instance per row, against
what pydantic writes for the declared model (the routes over HTTP: test_app)."""

from __future__ import annotations

import json
from typing import get_args

from hypothesis import given
from hypothesis import strategies as st

from core.risk import RiskLevel
from serving.api.routes.predict import Answers, batch_json, predictions_json
from serving.api.schemas import BatchPrediction, ModelRef, Prediction

MODEL = ModelRef(name="flood-risk", version=7, bento_tag="flood_risk:abc123")
LEVELS = get_args(RiskLevel)


@given(
    probabilities=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=20),
    level=st.sampled_from(LEVELS),
    client_request_id=st.one_of(st.none(), st.text(max_size=12)),
)
def test_each_row_is_what_pydantic_writes_for_its_prediction(
    probabilities: list[float], level: RiskLevel, client_request_id: str | None
) -> None:
    answers = Answers(probabilities=probabilities, risk_levels=[level] * len(probabilities), model=MODEL)
    rows = predictions_json(answers, request_id="r-1", client_request_id=client_request_id)
    for probability, row in zip(probabilities, rows, strict=True):
        expected = Prediction(
            probability=probability,
            risk_level=level,
            model=MODEL,
            request_id="r-1",
            client_request_id=client_request_id,
        ).model_dump_json()
        assert list(json.loads(row).items()) == list(json.loads(expected).items())
        assert Prediction.model_validate_json(row).probability == probability


@given(
    probabilities=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=20),
    client_request_id=st.one_of(st.none(), st.text(max_size=12)),
)
def test_the_batch_is_what_pydantic_writes_for_its_batch_prediction(
    probabilities: list[float], client_request_id: str | None
) -> None:
    levels: list[RiskLevel] = [LEVELS[i % len(LEVELS)] for i in range(len(probabilities))]
    answers = Answers(probabilities=probabilities, risk_levels=list(levels), model=MODEL)
    body = batch_json(answers, request_id="r-2", client_request_id=client_request_id)
    predictions = [
        Prediction(
            probability=p,
            risk_level=level,
            model=MODEL,
            request_id="r-2",
            client_request_id=client_request_id,
        )
        for p, level in zip(probabilities, levels, strict=True)
    ]
    expected = BatchPrediction(
        predictions=predictions, count=len(predictions), request_id="r-2", client_request_id=client_request_id
    ).model_dump_json()
    assert json.loads(body) == json.loads(expected)
    assert list(json.loads(body)) == list(json.loads(expected))
