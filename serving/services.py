"""The BentoML services: a batching model service and the API service in front of it.

Batching happens at two levels. Each API worker merges its concurrent requests into one
call to the model service (``serving.coalescing``: one HTTP hop takes ~5 ms inside the
model worker, nearly all BentoML's per-request handling; the forest ~10 µs), and the model service's
adaptive batcher merges the calls of all API workers into one model run. Both are switched
off together by SERVING_BATCHING=false, which exists to measure what they buy.

The model a Bento serves is fixed at build time by ``--arg model_tag=<name>:<version>``
(``flood bento build`` passes it); the Bento stores the argument, so serving the Bento by
tag, today or after a rollback, loads exactly that model and never ``latest``.

Before any worker starts, the deployment hook refuses unsafe production settings, an
unsigned or altered model (REQUIRE_MODEL_SIGNATURE) and an outdated ops schema. Each API
worker then holds its own key store, rate limiter and prediction log
(``serving.operations``), flushed when the worker stops. The HTTP edge is the FastAPI app
of ``serving.api``, mounted here; its routes reach this service through
``bentoml.get_current_service`` (``serving.api.deps``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, cast

import aiohttp
import bentoml
import numpy as np
from bentoml.exceptions import ServiceUnavailable
from bentoml.validators import ContentType

from core.errors import FloodError, ModelUnavailableError, OverloadedError
from core.settings import get_settings
from ops.signing import check_model_at_start
from serving import bentoml_internals
from serving.api.app import OPENAPI_PATH, create_app
from serving.api.deps import find_backend
from serving.api.headers import ResponseHeaders
from serving.coalescing import RowCoalescer
from serving.handover import mark_worker_ready
from serving.hardening import (
    bound_http_requests,
    bound_request_metric_labels,
    escape_access_log,
    run_arbiter_privately,
)
from serving.health import check_service, is_ready
from serving.memory import tune_garbage_collector
from serving.metrics import get_metrics, scrape_time_metrics
from serving.model_store import pinned_model_tag, served_model_of
from serving.operations import EdgeOperations
from serving.predictor import Predictor, ServedModel, engine_for
from serving.shutdown import GRACEFUL_SHUTDOWN_S, exit_with_arbiter, outlive_callers
from serving.startup import check_service_start
from serving.workerstates import PUBLISH_S, publish_state, state_dir

logger = logging.getLogger(__name__)

# Rows per model call. A full batch request (settings.predict_batch_max, 256 by default)
# fits in one call; the batcher splits anything larger.
MAX_BATCH_SIZE = 256
# The batcher's load-shedding deadline. It sheds (503) when its estimate of queue wait
# plus compute passes this; 100 ms is the p99 goal at concurrency 64, and a deadline at
# the goal itself shed requests during bursts that still met it, so it sits above it.
MAX_LATENCY_MS = 400
# BentoML's client to a dependency replaces its HTTP session every 100 requests or
# 300 s by default, closing it under in-flight calls (measured: 119 of 1109 requests
# failed at concurrency 16). One session for the life of the worker avoids that.
NEVER_RECYCLE = {"max_requests": 2**31 - 1, "max_age": 10.0**9}
API_SERVICE_NAME = "flood_risk"
# Calls one API worker keeps open to the model service; requests arriving meanwhile queue
# for the next call. Two overlap one call's HTTP round trip with the next one's batching
# (measured at concurrency 64: 714 req/s vs 605 with one).
MODEL_CALLS_IN_FLIGHT = 2
# The API drains for up to GRACEFUL_SHUTDOWN_S, then flushes its prediction log.
MODEL_OUTLIVES_API_S = 2 * GRACEFUL_SHUTDOWN_S


MODEL_TAG = pinned_model_tag()
# Paths OpenTelemetry skips (regular expressions, searched in the URL) unless SERVING_TRACING.
UNTRACED_API_PATHS = ["/api/v1/predict"]  # and /predict/batch
UNTRACED_MODEL_PATHS = ["/predict"]


def _observability(*, access_log: bool, untraced: list[str]) -> dict[str, Any]:
    """A service's ``logging`` and ``tracing`` configuration, from settings."""
    settings = get_settings()
    return {
        "logging": {"access": {"enabled": access_log}},
        "tracing": {"excluded_urls": [] if settings.serving_tracing else untraced},
    }


@bentoml.service(
    name="flood_risk_model",
    workers=1,
    traffic={"timeout": 30},
    runner_connection=NEVER_RECYCLE,
    **_observability(access_log=get_settings().serving_model_access_log, untraced=UNTRACED_MODEL_PATHS),
)
class FloodRiskModel:
    """Holds the model; concurrent requests are merged into one call by adaptive batching."""

    bento_model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        escape_access_log()
        stored = self.bento_model
        self.served = served_model_of(stored)
        check_model_at_start(Path(stored.path))
        self.predictor = Predictor.from_model_dir(
            Path(stored.path), expected_sha256=self.served.pipeline_sha256
        )
        logger.info("loaded %s (%s)", self.served.bento_model_tag, engine_for(Path(stored.path)))
        outlive_callers(API_SERVICE_NAME, max_wait_s=MODEL_OUTLIVES_API_S)
        exit_with_arbiter(graceful_s=MODEL_OUTLIVES_API_S)
        tune_garbage_collector()

    # BentoML reads the API's shape when the class is declared, so the switch is read here.
    @bentoml.api(
        batchable=get_settings().serving_batching,
        max_batch_size=MAX_BATCH_SIZE,
        max_latency_ms=MAX_LATENCY_MS,
    )
    # Async, so a batch runs on the worker's event loop: the forest takes microseconds to
    # a few milliseconds, less than handing it to a thread and back.
    # The declared media type spares BentoML rebuilding the output's JSON schema per call
    # (~0.2 ms), which it does to find the media type when none is declared.
    async def predict(self, raw: np.ndarray) -> Annotated[np.ndarray, ContentType("application/json")]:
        get_metrics().batch_size.observe(len(raw))
        return self.predictor.predict_proba(raw)


edge_app = create_app()
# Part of defining the service, like the decorators below: BentoML builds each worker's
# middleware after loading this module.
# The app's documented paths: FastAPI keeps included routers nested, so its route list
# alone does not name them.
bound_request_metric_labels([*edge_app.openapi()["paths"], OPENAPI_PATH])
# Both services' workers: request headers bounded in size and in the time to send them.
bound_http_requests(
    max_header_bytes=get_settings().serving_max_header_bytes,
    header_timeout_s=get_settings().serving_header_timeout_s,
)
# The process manager's command endpoints: a unix socket only this user can reach, not TCP.
run_arbiter_privately()


@bentoml.asgi_app(edge_app, path="/")
@bentoml.service(
    name=API_SERVICE_NAME,
    workers=get_settings().serving_api_workers,
    traffic={"timeout": 30},
    **_observability(access_log=get_settings().serving_access_log, untraced=UNTRACED_API_PATHS),
)
class FloodRiskAPI:
    """The public API; predictions go to the model service through ``bentoml.depends``."""

    bento_model = bentoml.models.BentoModel(MODEL_TAG)
    model = bentoml.depends(FloodRiskModel)

    @bentoml.on_deployment
    def refuse_unsafe_start() -> None:
        """Runs once in the ``bentoml serve`` process before any worker starts."""
        stored = bentoml.models.get(MODEL_TAG)
        try:
            check_service_start(Path(stored.path), model_data_source=served_model_of(stored).data_source)
        except FloodError as exc:
            # One clear message and exit 1, as the `flood` CLI does, rather than a
            # traceback from deep inside BentoML's server startup.
            sys.exit(f"error: {API_SERVICE_NAME} not started: {exc}")

    def __init__(self) -> None:
        escape_access_log()
        stored = self.bento_model
        self._served = served_model_of(stored)
        self._engine = engine_for(Path(stored.path))
        self._bento_tag = bentoml_internals.current_bento_tag() or "(development)"
        self._unavailable_reason = self._check_model_files(Path(stored.path))
        self._local_predictor: Predictor | None = None
        if get_settings().serving_model_in_process and self._unavailable_reason is None:
            self._local_predictor = Predictor.from_model_dir(
                Path(stored.path), expected_sha256=self._served.pipeline_sha256
            )
            logger.info("SERVING_MODEL_IN_PROCESS=true: the model runs in this API worker")
        self._operations = EdgeOperations.start()
        exit_with_arbiter(graceful_s=GRACEFUL_SHUTDOWN_S)
        self._coalescer = (
            RowCoalescer(self._call_model, max_rows=MAX_BATCH_SIZE, max_in_flight=MODEL_CALLS_IN_FLIGHT)
            if get_settings().serving_batching
            else None
        )
        tune_garbage_collector()

    @staticmethod
    def _check_model_files(model_dir: Path) -> str | None:
        """Why this worker must not answer, or None: its thresholds, labels and version come
        from the stored model's files, so it checks their signature itself. A worker restarted
        after the files changed refuses (503, not ready) instead of answering with them, and
        stays up, so the arbiter does not restart it in a loop."""
        try:
            check_model_at_start(model_dir)
        except FloodError as exc:
            logger.error("this API worker refuses to serve: %s", exc)
            # Clients see that it refuses, not the server's paths; the log has the detail.
            return "the served model failed its integrity check; see the server log"
        return None

    @bentoml.on_startup
    async def announce_ready(self) -> None:
        """Tell ``flood serve --replace`` when this worker can serve (``serving.handover``)."""

        async def wait_for_model() -> None:
            if self._unavailable_reason is not None:
                return  # never ready: a handover keeps the old server
            while not await self.model.is_ready(5):
                await asyncio.sleep(0.2)
            mark_worker_ready()

        # A task, not an await: the worker starts serving (503 until the model is up) as before.
        self._ready_task = asyncio.get_running_loop().create_task(wait_for_model())
        if (directory := state_dir()) is not None:
            self._publish_task = asyncio.get_running_loop().create_task(self._publish_states(directory))

    async def _publish_states(self, directory: Path) -> None:
        """This worker's operations state for the other workers' ``/health/detailed``."""
        while True:
            try:
                publish_state(directory, await self._operations.health())
            except OSError as exc:
                logger.warning("cannot publish this worker's state to %s: %s", directory, exc)
            await asyncio.sleep(PUBLISH_S)

    @bentoml.on_shutdown
    def close_operations(self) -> None:
        self._operations.close()

    async def __is_ready__(self) -> bool:
        """BentoML's ``/readyz``: the same checks as ``/health/ready``."""
        return is_ready(await check_service(self.predict_proba))

    def __metrics__(self, content: str) -> str:
        """BentoML's /metrics output plus what is read at scrape time (backups)."""
        return content + scrape_time_metrics()

    @property
    def operations(self) -> EdgeOperations:
        return self._operations

    @property
    def served(self) -> ServedModel:
        return self._served

    @property
    def engine(self) -> str:
        return self._engine

    @property
    def unavailable_reason(self) -> str | None:
        return self._unavailable_reason

    @property
    def bento_tag(self) -> str:
        return self._bento_tag

    async def predict_proba(self, raw: np.ndarray) -> np.ndarray:
        if self._unavailable_reason is not None:
            raise ModelUnavailableError(self._unavailable_reason)
        if self._coalescer is None:
            return await self._call_model(raw)
        return await self._coalescer.predict(raw)

    async def _call_model(self, raw: np.ndarray) -> np.ndarray:
        if self._local_predictor is not None:
            get_metrics().batch_size.observe(len(raw))
            return self._local_predictor.predict_proba(raw)
        try:
            return np.asarray(await self.model.to_async.predict(raw), dtype=np.float64)
        except ServiceUnavailable as exc:
            raise OverloadedError("overloaded, retry shortly") from exc
        except aiohttp.ClientError as exc:
            # A call in flight when the model worker died (the arbiter restarts it; calls
            # made meanwhile wait for it). Retrying is the client's choice: 503.
            logger.warning("model service call failed: %s", exc)
            raise ModelUnavailableError("model service unavailable, retry shortly") from exc


# The decorated class is a bentoml Service; type checkers still see the plain class.
cast(Any, FloodRiskAPI).add_asgi_middleware(ResponseHeaders, get_backend=find_backend)
