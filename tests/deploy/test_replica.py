"""The Ray Serve replica class without Ray: what the proxy would call, with a stand-in for
Ray's gRPC context (the real proxy path is in the slow test_ray_serve.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from ttaserve.deploy.metrics import REGISTRY, announced
from ttaserve.deploy.replica import REPLICA_PARAM, TtaserveReplica
from ttaserve.deploy.stores import DirectoryStore
from ttaserve.proto import grpc_service_pb2 as pb

# Ray Serve awaits the async __del__ at shutdown; Python's own collector calls it too, unawaited.
pytestmark = pytest.mark.filterwarnings("ignore:coroutine 'TtaserveReplica.__del__' was never awaited")


class Context:
    """The part of Ray's RayServegRPCContext the replica uses."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.metadata, self.code, self.details = metadata, grpc.StatusCode.OK, ""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


def request(x: np.ndarray, sequence_id: int = 0) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="demo")
    r.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    r.raw_input_contents.append(x.astype(np.float32).tobytes())
    if sequence_id:
        r.parameters["sequence_id"].int64_param = sequence_id
    return r


@pytest.fixture
def replica(tmp_path: Path) -> Iterator[tuple[TtaserveReplica, asyncio.AbstractEventLoop, DirectoryStore]]:
    tokens = tmp_path / "tokens"
    tokens.write_text("inference secret-1\ninference secret-2\n")
    settings = {"grpc_port": 0, "metrics_port": 0, "policy": "tent", "auth_token_file": str(tokens)}
    loop = asyncio.new_event_loop()
    obj = TtaserveReplica.__new__(TtaserveReplica)
    loop.run_until_complete(obj.__init__(settings, str(tmp_path / "store"), 0.0, replica_id="r1"))  # type: ignore[misc]
    try:
        yield obj, loop, DirectoryStore(tmp_path / "store")
    finally:
        loop.run_until_complete(obj.__del__())  # type: ignore[func-returns-value]
        loop.close()


AUTH = (("authorization", "Bearer secret-1"),)


def call(loop: asyncio.AbstractEventLoop, coro: Any) -> Any:
    return loop.run_until_complete(coro)


def test_infer_answers_and_writes_through(replica: Any) -> None:
    obj, loop, store = replica
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    ctx = Context(AUTH)
    response = call(loop, obj.ModelInfer(request(x, 7), ctx))
    assert ctx.code == grpc.StatusCode.OK
    assert response.parameters[REPLICA_PARAM].string_param == "r1"
    assert np.frombuffer(response.raw_output_contents[0], np.float32).shape == (40,)
    assert [k for k in store.keys("demo/")]  # the session's snapshot is in the shared store


def test_errors_become_status_codes(replica: Any) -> None:
    obj, loop, _ = replica
    ctx = Context(AUTH)
    call(loop, obj.ModelInfer(request(np.full((1, 1, 28, 28), 2.0, np.float32), 3), ctx))
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and "outside the model's range" in ctx.details
    ctx = Context(AUTH)
    call(loop, obj.ModelMetadata(pb.ModelMetadataRequest(name="nope"), ctx))
    assert ctx.code == grpc.StatusCode.NOT_FOUND


def test_tokens_are_checked_on_proxied_calls(replica: Any) -> None:
    obj, loop, store = replica
    x = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    for metadata, code in (((), grpc.StatusCode.UNAUTHENTICATED),
                           ((("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED)):
        ctx = Context(metadata)
        call(loop, obj.ModelInfer(request(x, 9), ctx))
        assert ctx.code == code
        ctx = Context(metadata)
        call(loop, obj.ModelConfig(pb.ModelConfigRequest(name="demo"), ctx))
        assert ctx.code == code
    assert store.keys("demo/") == []  # a refused request changes nothing
    ctx = Context()
    live = call(loop, obj.ServerLive(pb.ServerLiveRequest(), ctx))
    assert live.live and ctx.code == grpc.StatusCode.OK  # open for probes, as on one server
    health = call(loop, obj.Check(None, Context()))
    assert health.status == health.SERVING


def test_replica_announces_its_metrics_and_leaves(replica: Any) -> None:
    obj, loop, store = replica
    (info,) = announced(store)
    assert info["replica"] == "r1" and info["metrics"].startswith("http://127.0.0.1:")
    call(loop, obj.__del__())
    assert store.keys(f"{REGISTRY}/") == []
    obj.__del__ = _noop  # the fixture's own teardown finds it stopped


async def _noop() -> None:
    return None


def test_sessions_belong_to_the_principal_on_a_replica(replica: Any) -> None:
    """Proxied calls reach the caller's own sessions, as on one server (and a routed stream
    message carries its principal: infer_routed(request, owner=...))."""
    obj, loop, _ = replica
    x = np.random.default_rng(1).random((4, 1, 28, 28), dtype=np.float32)
    for _ in range(2):
        call(loop, obj.ModelInfer(request(x, 11), Context(AUTH)))
    other = (("authorization", "Bearer secret-2"),)
    call(loop, obj.ModelInfer(request(x, 11), Context(other)))
    batches = sorted(s.batches for s in obj.server.repository.get("demo").engine.sessions.live())
    assert batches == [1, 2]  # one session per principal for the same id
    data, error = call(loop, obj.infer_routed(request(x, 11), owner=obj._owner(Context(other))))
    assert error is None
    assert sorted(s.batches for s in obj.server.repository.get("demo").engine.sessions.live()) == [2, 2]
