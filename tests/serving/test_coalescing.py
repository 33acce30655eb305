"""RowCoalescer: concurrent predictions merged into few model calls, each caller its own answer.

No pytest-asyncio here: each test drives its coroutine with ``asyncio.run``. Ordering is
controlled with events and ``asyncio.sleep(0)`` (one loop iteration); no assertion depends on
wall-clock time (a 10 s timeout only turns a hang into a failure).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
import pytest

from serving.coalescing import RowCoalescer

BAD = -1.0  # a row whose first feature is BAD makes the fake model fail its whole call


def expected(rows: np.ndarray) -> np.ndarray:
    return rows[:, 0] * 2 + rows[:, 1]


def rows_of(*firsts: float) -> np.ndarray:
    """One row per value: (first, 10 * first), distinct per row so mix-ups show."""
    return np.array([[f, 10 * f] for f in firsts], dtype=np.float64)


class FakeModel:
    """A row-dependent async model that records every call and can hold calls open."""

    def __init__(self, *, hold: bool = False) -> None:
        self.batches: list[np.ndarray] = []
        self.releases: list[asyncio.Event] = []  # one per call, waited on while holding
        self.hold = hold
        self.open = 0
        self.max_open = 0
        self.started = asyncio.Event()  # set when the first call starts
        self.answer: Callable[[np.ndarray], Any] = expected

    def release(self, call: int) -> None:
        self.releases[call].set()

    def release_all(self) -> None:
        self.hold = False
        for release in self.releases:
            release.set()

    async def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.batches.append(rows.copy())
        release = asyncio.Event()
        self.releases.append(release)
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        self.started.set()
        try:
            if self.hold:
                await release.wait()
            await asyncio.sleep(0)  # let other calls overlap this one
            if (rows[:, 0] == BAD).any():
                raise ValueError(f"bad row in a call of {len(rows)}")
            return np.asarray(self.answer(rows))
        finally:
            self.open -= 1

    @property
    def sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]


async def settle(iterations: int = 10) -> None:
    """Let the loop run a few iterations (no timers involved)."""
    for _ in range(iterations):
        await asyncio.sleep(0)


def start(coalescer: RowCoalescer, requests: Sequence[np.ndarray]) -> list[asyncio.Task[np.ndarray]]:
    return [asyncio.create_task(coalescer.predict(rows)) for rows in requests]


def run(test: Callable[[], Awaitable[None]]) -> None:
    # The timeout only turns a hang (a caller never answered) into a failure; nothing here
    # takes more than a few loop iterations.
    asyncio.run(asyncio.wait_for(test(), timeout=10))


def test_a_lone_request_goes_at_once_with_exactly_its_rows() -> None:
    async def scenario() -> None:
        model = FakeModel()
        coalescer = RowCoalescer(model, max_rows=64)
        rows = rows_of(1, 2, 3)
        task = asyncio.create_task(coalescer.predict(rows))
        # A handful of loop iterations, no clock: a timer-based batcher would still be waiting.
        await settle()
        assert task.done()
        np.testing.assert_array_equal(task.result(), expected(rows))
        assert len(model.batches) == 1
        np.testing.assert_array_equal(model.batches[0], rows)
        assert model.open == 0

    run(scenario)


def test_concurrent_requests_share_few_calls_and_each_gets_its_own_answer() -> None:
    async def scenario() -> None:
        model = FakeModel(hold=True)
        coalescer = RowCoalescer(model, max_rows=8, max_in_flight=2)
        requests = [rows_of(i + 0.5) for i in range(50)]
        tasks = start(coalescer, requests)
        await settle()
        # The first two requests went at once, one each; the other 48 wait for a free slot.
        assert model.sizes == [1, 1]
        assert model.open == 2
        assert not any(task.done() for task in tasks)

        model.release_all()
        answers = await asyncio.gather(*tasks)

        assert len(model.batches) == 2 + 48 // 8  # far fewer calls than the 50 requests
        assert max(model.sizes) <= 8
        assert model.max_open <= 2
        # Every row was sent exactly once, in arrival order.
        np.testing.assert_array_equal(np.concatenate(model.batches), np.concatenate(requests))
        for rows, answer in zip(requests, answers, strict=True):
            np.testing.assert_array_equal(answer, expected(rows))
        assert model.open == 0

    run(scenario)


def test_a_multi_row_request_stays_together_and_in_order() -> None:
    async def scenario() -> None:
        model = FakeModel(hold=True)
        coalescer = RowCoalescer(model, max_rows=5, max_in_flight=1)
        first, b, c, d = rows_of(1), rows_of(2, 3, 4), rows_of(5, 6, 7), rows_of(8, 9)
        tasks = start(coalescer, [first, b, c, d])
        await model.started.wait()
        model.release_all()
        answers = await asyncio.gather(*tasks)

        # b + c would be 6 rows > 5: c is not split to fill the call, it goes with d.
        assert model.sizes == [1, 3, 5]
        np.testing.assert_array_equal(model.batches[1], b)
        np.testing.assert_array_equal(model.batches[2], np.concatenate([c, d]))
        for rows, answer in zip([first, b, c, d], answers, strict=True):
            np.testing.assert_array_equal(answer, expected(rows))

    run(scenario)


def test_a_request_larger_than_max_rows_goes_alone() -> None:
    async def scenario() -> None:
        model = FakeModel(hold=True)
        coalescer = RowCoalescer(model, max_rows=4, max_in_flight=1)
        big = rows_of(*range(10, 20))
        requests = [rows_of(1), rows_of(2), big, rows_of(3)]
        tasks = start(coalescer, requests)
        await model.started.wait()
        model.release_all()
        answers = await asyncio.gather(*tasks)

        assert model.sizes == [1, 1, 10, 1]
        np.testing.assert_array_equal(model.batches[2], big)
        for rows, answer in zip(requests, answers, strict=True):
            np.testing.assert_array_equal(answer, expected(rows))

        # Alone in a quiet period too: one call, all of it.
        lone = await coalescer.predict(big)
        np.testing.assert_array_equal(lone, expected(big))
        assert model.sizes[-1] == 10

    run(scenario)


def test_a_failed_call_fails_exactly_its_callers_and_later_calls_still_go() -> None:
    async def scenario() -> None:
        model = FakeModel(hold=True)
        coalescer = RowCoalescer(model, max_rows=3, max_in_flight=1)
        held = rows_of(1)
        failing = [rows_of(2), rows_of(BAD), rows_of(3)]  # one call of 3 rows
        later = [rows_of(4), rows_of(5)]  # the call after it
        tasks = start(coalescer, [held, *failing, *later])
        await model.started.wait()
        model.release_all()
        results = await asyncio.gather(*tasks, return_exceptions=True)

        assert model.sizes == [1, 3, 2]
        errors = results[1:4]
        assert all(isinstance(error, ValueError) for error in errors)
        assert errors[0] is errors[1] is errors[2]  # the call's own exception, to each caller
        assert "bad row in a call of 3" in str(errors[0])
        for rows, result in zip([held, *later], [results[0], *results[4:]], strict=True):
            assert isinstance(result, np.ndarray)
            np.testing.assert_array_equal(result, expected(rows))
        assert model.open == 0

    run(scenario)


@pytest.mark.parametrize(
    "wrong", [lambda rows: expected(rows)[:-1], lambda rows: np.append(expected(rows), 0.0)]
)
def test_a_wrong_number_of_answer_rows_fails_the_callers(wrong: Callable[[np.ndarray], np.ndarray]) -> None:
    async def scenario() -> None:
        model = FakeModel(hold=True)
        model.answer = wrong
        coalescer = RowCoalescer(model, max_rows=8, max_in_flight=1)
        tasks = start(coalescer, [rows_of(1), rows_of(2, 3), rows_of(4)])
        await model.started.wait()
        model.release_all()
        results = await asyncio.gather(*tasks, return_exceptions=True)

        assert model.sizes == [1, 3]
        for result in results:
            assert isinstance(result, RuntimeError)
            assert "model answered" in str(result)
        assert model.open == 0

    run(scenario)


def test_a_caller_cancelled_while_queued_is_not_sent_and_others_are_unaffected() -> None:
    async def scenario() -> None:
        model = FakeModel(hold=True)
        coalescer = RowCoalescer(model, max_rows=8, max_in_flight=1)
        held, b, gone, d = rows_of(1), rows_of(2), rows_of(3), rows_of(4)
        tasks = start(coalescer, [held, b, gone, d])
        await model.started.wait()
        tasks[2].cancel()
        await settle()
        model.release_all()
        results = await asyncio.gather(*tasks, return_exceptions=True)

        assert isinstance(results[2], asyncio.CancelledError)
        assert tasks[2].cancelled()
        assert model.sizes == [1, 2]
        np.testing.assert_array_equal(model.batches[1], np.concatenate([b, d]))  # no `gone` rows
        for rows, result in zip([held, b, d], [results[0], results[1], results[3]], strict=True):
            assert isinstance(result, np.ndarray)
            np.testing.assert_array_equal(result, expected(rows))
        assert model.open == 0

    run(scenario)


def test_when_every_queued_caller_is_cancelled_no_call_is_made() -> None:
    async def scenario() -> None:
        model = FakeModel(hold=True)
        coalescer = RowCoalescer(model, max_rows=8, max_in_flight=1)
        tasks = start(coalescer, [rows_of(1), rows_of(2), rows_of(3)])
        await model.started.wait()
        for task in tasks[1:]:
            task.cancel()
        await settle()
        model.release_all()
        await asyncio.gather(*tasks, return_exceptions=True)

        assert model.sizes == [1]
        assert model.open == 0
        # The coalescer still works afterwards.
        np.testing.assert_array_equal(await coalescer.predict(rows_of(7)), expected(rows_of(7)))

    run(scenario)


def test_a_caller_cancelled_mid_call_does_not_disturb_the_rest_of_its_call() -> None:
    async def scenario() -> None:
        model = FakeModel(hold=True)
        coalescer = RowCoalescer(model, max_rows=8, max_in_flight=1)
        held, b, c = rows_of(1), rows_of(2), rows_of(3)
        tasks = start(coalescer, [held, b, c])
        await model.started.wait()
        model.release(0)
        await settle()  # the call for b + c is now in flight, held
        assert model.sizes == [1, 2]
        assert not tasks[1].done()
        tasks[1].cancel()
        await settle()
        model.release(1)
        results = await asyncio.gather(*tasks, return_exceptions=True)

        assert isinstance(results[1], asyncio.CancelledError)
        for rows, result in zip([held, c], [results[0], results[2]], strict=True):
            assert isinstance(result, np.ndarray)
            np.testing.assert_array_equal(result, expected(rows))
        assert model.open == 0

    run(scenario)


@pytest.mark.parametrize(("max_rows", "max_in_flight"), [(0, 2), (-1, 2), (8, 0), (8, -3)])
def test_the_constructor_rejects_limits_below_one(max_rows: int, max_in_flight: int) -> None:
    async def never(rows: np.ndarray) -> np.ndarray:
        raise AssertionError("not called")

    with pytest.raises(ValueError, match="at least 1"):
        RowCoalescer(never, max_rows=max_rows, max_in_flight=max_in_flight)


def test_an_answer_without_rows_fails_the_callers_with_an_error_not_a_cancellation() -> None:
    async def scalar_model(rows: np.ndarray) -> np.ndarray:
        return np.float64(1.0)  # type: ignore[return-value]

    async def scenario() -> None:
        coalescer = RowCoalescer(scalar_model, max_rows=8)
        with pytest.raises(RuntimeError, match="model answered"):
            await coalescer.predict(np.ones((2, 2)))

    asyncio.run(scenario())


def test_a_malformed_request_fails_only_the_call_it_is_in_with_an_error() -> None:
    async def model(rows: np.ndarray) -> np.ndarray:
        await asyncio.sleep(0)
        return rows[:, 0] * 2

    async def scenario() -> None:
        coalescer = RowCoalescer(model, max_rows=8, max_in_flight=1)
        shapes = [(1, 2), (1, 2), (1, 3)]  # the last two share a call
        tasks = [asyncio.create_task(coalescer.predict(np.ones(s))) for s in shapes]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert not any(isinstance(r, asyncio.CancelledError) for r in results), results
        np.testing.assert_array_equal(results[0], [2.0])
        assert all(isinstance(r, ValueError) for r in results[1:]), results

    asyncio.run(scenario())
