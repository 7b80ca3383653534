"""A real grpc.aio server on free loopback ports, run in a background thread.

The server's protobuf stubs live in a private descriptor pool, so the stock tritonclient
can be imported in the same process."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from ttaserve.server.app import Server, start
from ttaserve.server.auth import ANONYMOUS
from ttaserve.server.keys import SessionKey
from ttaserve.server.settings import ServerSettings


@dataclass
class Handle:
    server: Server
    loop: asyncio.AbstractEventLoop

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def metrics_url(self) -> str:
        assert self.server.metrics_http is not None
        return self.server.metrics_http.url

    def client(self) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(self.url)

    def engine(self, model: str = "demo") -> Any:
        return self.server.repository.get(model).engine

    def session(self, sequence_id: int | str, owner: str = ANONYMOUS, model: str = "demo") -> Any:
        """The live session a client of ``owner`` reaches with ``sequence_id`` (or None)."""
        return self.engine(model).sessions.get(SessionKey(owner, sequence_id))

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextmanager
def running_server(**overrides: Any) -> Iterator[Handle]:
    settings = ServerSettings(**{"grpc_port": 0, "metrics_port": 0, **overrides})
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-server-loop", daemon=True)
    thread.start()
    handle = Handle(asyncio.run_coroutine_threadsafe(start(settings), loop).result(120), loop)
    try:
        yield handle
    finally:
        if not handle.server.inference.draining:
            handle.call(handle.server.stop(1.0))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture(scope="module")
def served() -> Iterator[Handle]:
    with running_server() as handle:
        yield handle


def infer_input(x: np.ndarray, name: str = "input", datatype: str = "FP32") -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def start_process(*args: str) -> tuple[subprocess.Popen, str, str]:
    """`python -m ttaserve serve` on free ports as a real process; returns it with its gRPC
    address and metrics URL once it reports ready."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ttaserve", "serve", "--grpc-port", "0", "--metrics-port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline, line = time.monotonic() + 120, ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if line.startswith("ttaserve ready") or not line:
            break
    match = re.search(r"gRPC (\S+), metrics (\S+)", line)
    if not match:
        proc.kill()
        raise AssertionError(f"server did not start: {line!r}")
    return proc, match.group(1), match.group(2)
