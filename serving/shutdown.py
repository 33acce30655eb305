"""Graceful shutdown across two services: the model outlives the API that calls it.

On SIGTERM the ``bentoml serve`` arbiter (circus) signals the workers of every service at
once. The API workers stop accepting and drain their in-flight requests, but those
requests still call the model service; if its worker exited at the same moment, a request
that had not yet sent its model call got a 500. So the model worker keeps serving after
the signal until no API worker is left (they exit once drained), then lets uvicorn shut
down as usual. It waits at most ``max_wait_s``; a second signal does not cut it short,
which is what the arbiter's own SIGKILL after its graceful timeout is for.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import psutil

logger = logging.getLogger(__name__)

# What `flood serve` passes as --timeout-graceful-shutdown: how long the API drains after
# SIGTERM. The services size the model worker's wait for its callers from it.
GRACEFUL_SHUTDOWN_S = 30
_POLL_S = 0.05
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
Handler = Callable[[int, FrameType | None], Any]


def service_workers(service_name: str) -> list[psutil.Process]:
    """This process's siblings (children of the arbiter) that run ``service_name``."""
    try:
        siblings = psutil.Process(os.getppid()).children()
    except psutil.Error:
        return []
    workers = []
    for process in siblings:
        if process.pid == os.getpid():
            continue
        try:
            argv = process.cmdline()
        except psutil.Error:  # exited, or not ours to inspect
            continue
        if ("--service-name", service_name) in itertools.pairwise(argv):
            workers.append(process)
    return workers


def wait_for_exit(processes: list[psutil.Process], *, timeout_s: float) -> bool:
    """Whether every process exited within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(_running(p) for p in processes):
            return True
        time.sleep(_POLL_S)
    return not any(_running(p) for p in processes)


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def outlive_callers(caller_service: str, *, max_wait_s: float) -> None:
    """Defer this worker's exit on SIGTERM/SIGINT until ``caller_service``'s workers are gone.

    Call it from the worker's startup (the service's ``__init__``): uvicorn has installed its
    signal handlers by then, and they are what runs once the callers have drained.
    """
    if threading.current_thread() is not threading.main_thread():
        logger.warning("not on the main thread; shutdown will not wait for %s", caller_service)
        return
    started = threading.Event()
    for signum in _SIGNALS:
        previous = signal.getsignal(signum)
        if not callable(previous):
            continue
        signal.signal(signum, _deferring(previous, started, caller_service, max_wait_s))


def _deferring(
    previous: Handler, started: threading.Event, caller_service: str, max_wait_s: float
) -> Handler:
    def handle(signum: int, _: FrameType | None) -> None:
        if started.is_set():
            return
        started.set()
        threading.Thread(
            target=_wait_then_exit,
            args=(previous, signum, caller_service, max_wait_s),
            name="outlive-callers",
            daemon=True,
        ).start()

    return handle


def _wait_then_exit(previous: Handler, signum: int, caller_service: str, max_wait_s: float) -> None:
    callers = service_workers(caller_service)
    start = time.monotonic()
    if callers:
        logger.info(
            "signal %d: serving until %d %s worker(s) have drained", signum, len(callers), caller_service
        )
        if not wait_for_exit(callers, timeout_s=max_wait_s):
            logger.warning("%s workers still running after %.0f s; shutting down", caller_service, max_wait_s)
    logger.info("shutting down after %.2f s", time.monotonic() - start)
    # uvicorn's handler only sets flags its main loop polls, so calling it from here is safe.
    previous(signum, None)
