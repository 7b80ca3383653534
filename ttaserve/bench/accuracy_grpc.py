"""``bench accuracy --via-grpc``: the same streams sent to a real server with tritonclient.

Each row gets its own in-process server (``ttaserve.server.app.start`` on a free loopback
port, metrics off) whose default policy is the row's policy with the row's parameters, so
parameter variants need no extra wire parameters. Every episode is one Triton sequence
(``sequence_start`` on its first request, ``sequence_end`` on its last). Rows the stock
server cannot express (another model, guard off) run in-process and say so in the JSON.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable

import numpy as np
import torch

from ttaserve.adapters import PreparedModel
from ttaserve.bench.accuracy_rows import EnginePredictor, Predictor, Row, engine_for

__all__ = ["GrpcPredictor", "predictor_factory"]


class GrpcPredictor:
    """Predicts through a freshly started server, over gRPC, with the stock client."""

    path = "grpc"

    def __init__(self, row: Row) -> None:
        import tritonclient.grpc as grpcclient

        from ttaserve.server.app import start
        from ttaserve.server.settings import ServerSettings

        settings = ServerSettings(host="127.0.0.1", grpc_port=0, metrics_port=-1, policy=row.policy,
                                  policy_params=dict(row.params), grace_s=1.0)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-server", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(start(settings), self._loop).result(120)
        self._client = grpcclient.InferenceServerClient(f"127.0.0.1:{self._server.grpc_port}")
        self._grpc = grpcclient
        self._ids: dict[str, int] = {}
        self._next = itertools.count(1)

    def predict(self, x: torch.Tensor, session: str, start: bool, end: bool) -> torch.Tensor:
        sequence = self._ids.setdefault(session, next(self._next))
        array = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        tensor = self._grpc.InferInput("input", list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        reply = self._client.infer("demo", [tensor], sequence_id=sequence, sequence_start=start,
                                   sequence_end=end)
        return torch.from_numpy(reply.as_numpy("logits").copy())

    def finish(self, session: str) -> int | None:
        self._ids.pop(session, None)
        return None  # resets are not on the inference API

    def close(self) -> None:
        self._client.close()
        asyncio.run_coroutine_threadsafe(self._server.stop(1.0), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def predictor_factory(models: dict[str, PreparedModel]) -> Callable[[Row], Predictor]:
    """A row's predictor for ``--via-grpc``: the server when it can run the row."""

    def build(row: Row) -> Predictor:
        if row.servable:
            return GrpcPredictor(row)
        why = "guard off" if not row.guard else f"model {row.model}"
        return EnginePredictor(engine_for(row, models), f"in-process (not servable: {why})")

    return build
