"""The practical ceiling of Python serving here: bare uvicorn, one ASGI callable, ONNX Runtime.

No framework, no middleware, no second process hop: read the body, validate it with the
same ``Observation`` contract, derive the same features and run the same ``model.onnx``
(one thread) that the Bento serves. Routes: ``/predict`` (one observation) and
``/predict/batch`` (``{"observations": [...]}``). Run by the harness as

    python -m benchmarks.ceiling --workers 2 --port 8000

with ``FLOOD_BENCH_MODEL_DIR`` naming a BentoML model directory (pipeline + model.onnx).

Why not ``uvicorn --workers 2``: with more than one worker uvicorn binds its socket as
``socket(AF_INET)``, protocol 0, and asyncio only turns on TCP_NODELAY for sockets whose
protocol is IPPROTO_TCP. The response's header and body writes then meet Nagle's
algorithm and the client's delayed ACK: every request on a connection takes ~44 ms
(measured: 22 req/s at one connection instead of ~1,600). ``mlflow models serve -w 2``
runs into the same thing. The ceiling binds its own socket with IPPROTO_TCP.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from core.observation import FIELD_NAMES, Observation
from serving.predictor import Predictor, engine_for

MODEL_DIR_ENV = "FLOOD_BENCH_MODEL_DIR"
PIPELINE_SHA_ENV = "FLOOD_BENCH_PIPELINE_SHA256"

Scope = dict[str, Any]


class ObservationBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    observations: list[Observation]


def rows_of(observations: list[Observation]) -> np.ndarray:
    rows = [[getattr(o, name) for name in FIELD_NAMES] for o in observations]
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(FIELD_NAMES))


class CeilingApp:
    def __init__(self, predictor: Predictor, engine: str) -> None:
        self.predictor = predictor
        self.engine = engine

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # served with --lifespan off
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status, answer = self.answer(scope["path"], body)
        payload = json.dumps(answer).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    def answer(self, path: str, body: bytes) -> tuple[int, Any]:
        try:
            if path == "/predict":
                observations = [Observation.model_validate_json(body)]
            elif path == "/predict/batch":
                observations = ObservationBatch.model_validate_json(body).observations
            elif path == "/health":
                return 200, {"status": "healthy", "engine": self.engine}
            else:
                return 404, {"error": "not found"}
        except ValidationError as exc:
            return 422, {"error": str(exc)}
        probabilities = self.predictor.predict_proba(rows_of(observations))
        if path == "/predict":
            return 200, {"probability": float(probabilities[0])}
        return 200, {"probabilities": [float(p) for p in probabilities]}


def create_app() -> CeilingApp:
    model_dir = Path(os.environ[MODEL_DIR_ENV])
    predictor = Predictor.from_model_dir(model_dir, expected_sha256=os.environ[PIPELINE_SHA_ENV])
    return CeilingApp(predictor, engine_for(model_dir))


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening socket whose connections get TCP_NODELAY from asyncio (see the docstring)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> None:
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    parser = argparse.ArgumentParser(description="The bare uvicorn + ONNX Runtime ceiling.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    config = uvicorn.Config(
        "benchmarks.ceiling:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        lifespan="off",
        access_log=False,
        log_level="warning",
    )
    sock = bind_tcp(args.host, args.port)
    if args.workers > 1:
        Multiprocess(config, sockets=[sock]).run()
    else:
        uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
