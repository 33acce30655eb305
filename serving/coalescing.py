"""Merging an API worker's concurrent predictions into few calls to the model service.

Every call to the model service takes ~5 ms inside the model worker, almost all of it
BentoML's per-request handling (parsing, schema, tracing, metrics, access log), against
~10 µs for the forest itself, so one HTTP call per prediction caps the whole service at ~250 predictions/s
however well the model service batches them. The coalescer sends whatever rows have queued
up as one call, without a timer: the first request of a quiet period goes at once (no added
latency), and requests that arrive while ``max_in_flight`` calls are out wait for the next
one. The model service's own adaptive batcher still merges the calls of several API workers.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

ModelCall = Callable[[np.ndarray], Awaitable[np.ndarray]]


@dataclass
class _Waiting:
    rows: np.ndarray
    answer: asyncio.Future[np.ndarray]


class RowCoalescer:
    """Answers ``predict(rows)`` through as few ``call(all_rows)`` as concurrency allows.

    A call never carries more than ``max_rows`` rows, except a single request larger than
    that, which goes alone. A failed call fails exactly the requests it carried, with the
    call's exception; requests queued behind it still go.
    """

    def __init__(self, call: ModelCall, *, max_rows: int, max_in_flight: int = 2) -> None:
        if max_rows < 1 or max_in_flight < 1:
            raise ValueError("max_rows and max_in_flight must be at least 1")
        self._call = call
        self._max_rows = max_rows
        self._max_in_flight = max_in_flight
        self._queue: deque[_Waiting] = deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def predict(self, rows: np.ndarray) -> np.ndarray:
        answer: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(rows, answer))
        self._dispatch()
        return await answer

    def _dispatch(self) -> None:
        while self._queue and self._in_flight < self._max_in_flight:
            group = self._take_group()
            if not group:
                continue
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(group))
            # Held until done: the event loop keeps only weak references to tasks.
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take_group(self) -> list[_Waiting]:
        group: list[_Waiting] = []
        rows = 0
        while self._queue:
            waiting = self._queue[0]
            if waiting.answer.done():  # its caller was cancelled (client went away)
                self._queue.popleft()
                continue
            if group and rows + len(waiting.rows) > self._max_rows:
                break
            group.append(self._queue.popleft())
            rows += len(waiting.rows)
        return group

    async def _send(self, group: list[_Waiting]) -> None:
        try:
            answers = await self._answer(group)
        except Exception as exc:  # every failure belongs to the callers it carried
            for waiting in group:
                if not waiting.answer.done():
                    waiting.answer.set_exception(exc)
        else:
            for waiting, answer in zip(group, answers, strict=True):
                if not waiting.answer.done():
                    waiting.answer.set_result(answer)
        finally:
            # Cancelled mid-call (the worker is stopping): nobody is left waiting forever.
            for waiting in group:
                if not waiting.answer.done():
                    waiting.answer.cancel()
            self._in_flight -= 1
            self._dispatch()

    async def _answer(self, group: list[_Waiting]) -> list[np.ndarray]:
        merged = group[0].rows if len(group) == 1 else np.concatenate([w.rows for w in group])
        result = np.atleast_1d(np.asarray(await self._call(merged)))
        if result.ndim != 1 or len(result) != len(merged):
            raise RuntimeError(f"model answered shape {result.shape} for {len(merged)} rows")
        ends = np.cumsum([len(w.rows) for w in group])
        return np.split(result, ends[:-1])
