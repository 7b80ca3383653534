"""Invariants that never get looser: session isolation, bad input changes nothing,
graceful shutdown."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.server.conftest import Handle, images, infer_input, running_server
from ttaserve.adapters import policy_names
from ttaserve.server.keys import SessionKey


def _stream(handle: Handle, requests: list[tuple[object, np.ndarray, str]]) -> list[bytes]:
    """Send (sequence_id, batch, policy) requests on one stream; raw logits bytes in order."""
    client = handle.client()
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    out = []
    try:
        for sid, x, policy in requests:
            client.async_stream_infer("demo", [infer_input(x)], sequence_id=sid,
                                      parameters={"tta_policy": policy})
            result, error = results.get(timeout=60)
            assert error is None, error
            out.append(result.as_numpy("logits").tobytes())
    finally:
        client.stop_stream()
    return out


@pytest.mark.parametrize("policy", policy_names())
def test_session_alone_equals_session_interleaved(served: Handle, policy: str) -> None:
    """A session's responses are bit-identical whether or not another session (with a
    different policy and data) is served at the same time."""
    mine = [images(8, seed=s) for s in range(4)]
    noise = [np.clip(images(8, seed=50 + s) * 3.0, 0, 1) for s in range(4)]
    base = 10_000 + 100 * policy_names().index(policy)
    alone = _stream(served, [(base + 1, x, policy) for x in mine])
    other = "tbn" if policy != "tbn" else "source"
    mixed = []
    for x, y in zip(mine, noise):
        mixed += [(base + 2, x, policy), (base + 3, y, other)]
    interleaved = _stream(served, mixed)[0::2]
    assert interleaved == alone


def test_concurrent_streams_do_not_interfere(served: Handle) -> None:
    mine = [images(8, seed=s) for s in range(6)]
    alone = _stream(served, [(20_001, x, "tbn") for x in mine])
    shared: list[list[bytes]] = []
    noisy = threading.Thread(target=lambda: _stream(
        served, [(20_002, np.ones((32, 1, 28, 28), np.float32), "alpha-bn")] * 6))
    noisy.start()
    shared.append(_stream(served, [(20_003, x, "tbn") for x in mine]))
    noisy.join()
    assert shared[0] == alone


def _raw_request(**changes: object) -> service_pb2.ModelInferRequest:
    x = images(2)
    request = service_pb2.ModelInferRequest(model_name="demo")
    request.inputs.add(name="input", datatype="FP32", shape=[2, 1, 28, 28])
    request.raw_input_contents.append(x.tobytes())
    request.parameters["sequence_id"].int64_param = 31337
    for key, value in changes.items():
        BAD_INPUTS[key](request, value)
    return request


def _set_param(request: service_pb2.ModelInferRequest, spec: tuple[str, str, object]) -> None:
    name, kind, value = spec
    setattr(request.parameters[name], kind, value)


BAD_INPUTS = {
    "model": lambda r, v: setattr(r, "model_name", v),
    "version": lambda r, v: setattr(r, "model_version", v),
    "name": lambda r, v: setattr(r.inputs[0], "name", v),
    "datatype": lambda r, v: setattr(r.inputs[0], "datatype", v),
    "shape": lambda r, v: (r.inputs[0].ClearField("shape"), r.inputs[0].shape.extend(v)),
    "raw": lambda r, v: (r.ClearField("raw_input_contents"), r.raw_input_contents.append(v)),
    "param": _set_param,
    "extra_input": lambda r, v: r.inputs.add(name=v, datatype="FP32", shape=[2, 1, 28, 28]),
    "output": lambda r, v: r.outputs.add(name=v),
}
NAN = np.full((2, 1, 28, 28), np.nan, np.float32).tobytes()
TOO_BRIGHT = np.full((2, 1, 28, 28), 7.0, np.float32).tobytes()

CASES = [
    ({"model": "nope"}, grpc.StatusCode.NOT_FOUND, "unknown model"),
    ({"version": "9"}, grpc.StatusCode.NOT_FOUND, "no version"),
    ({"name": "image"}, grpc.StatusCode.INVALID_ARGUMENT, "unexpected input 'image'"),
    ({"datatype": "FP64"}, grpc.StatusCode.INVALID_ARGUMENT, "must be FP32"),
    ({"datatype": "FLOAT"}, grpc.StatusCode.INVALID_ARGUMENT, "not a datatype"),
    ({"shape": [2, 3, 28, 28]}, grpc.StatusCode.INVALID_ARGUMENT, "expected [-1, 1, 28, 28]"),
    ({"shape": [2, 28, 28]}, grpc.StatusCode.INVALID_ARGUMENT, "has shape"),
    ({"raw": b"\x00" * 100}, grpc.StatusCode.INVALID_ARGUMENT, "bytes do not match"),
    ({"raw": NAN}, grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
    ({"raw": TOO_BRIGHT}, grpc.StatusCode.INVALID_ARGUMENT, "outside the model's range"),
    ({"param": ("sequence_id", "double_param", 1.5)}, grpc.StatusCode.INVALID_ARGUMENT, "sequence_id"),
    ({"param": ("sequence_start", "int64_param", 1)}, grpc.StatusCode.INVALID_ARGUMENT, "must be bool"),
    ({"param": ("tta_policy", "bool_param", True)}, grpc.StatusCode.INVALID_ARGUMENT, "must be string"),
    ({"param": ("tta_policy", "string_param", "magic")}, grpc.StatusCode.INVALID_ARGUMENT, "unknown policy"),
    ({"param": ("triton_enable_empty_final_response", "bool_param", True)},
     grpc.StatusCode.INVALID_ARGUMENT, "unknown parameter"),
    ({"extra_input": "input"}, grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents has 1 entries"),
    ({"output": "probs"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown output"),
    ({"shape": [0, 1, 28, 28], "raw": b""}, grpc.StatusCode.INVALID_ARGUMENT, "batch size 0"),
]


@pytest.mark.parametrize(("changes", "code", "message"), CASES,
                         ids=[next(iter(c[0])) + ":" + c[2] for c in CASES])
def test_bad_request_is_rejected_and_changes_nothing(
    served: Handle, changes: dict, code: grpc.StatusCode, message: str
) -> None:
    sessions = served.engine().sessions
    with grpc.insecure_channel(served.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(_raw_request())  # a good request creates the session
        before = {k: v.clone() for k, v in sessions.get(key(31337)).state.items()}
        batches = sessions.get(key(31337)).batches
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(_raw_request(**changes))
    assert err.value.code() == code
    assert message in err.value.details()
    session = sessions.get(key(31337))
    assert session.batches == batches
    assert all(torch.equal(before[k], session.state[k]) for k in before)


def test_stream_survives_malformed_messages(served: Handle) -> None:
    client = served.client()
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    good = infer_input(images(2))
    bad = infer_input(np.full((2, 1, 28, 28), np.inf, np.float32))
    try:
        for x in (good, bad, good, infer_input(images(2, 1)[:, :, :14], "input"), good):
            client.async_stream_infer("demo", [x], sequence_id=4242)
        outcomes = [results.get(timeout=30) for _ in range(5)]
    finally:
        client.stop_stream()
    errors = [e for _, e in outcomes]
    assert errors[0] is None and errors[2] is None and errors[4] is None
    assert "NaN or Inf" in str(errors[1]) and "has shape" in str(errors[3])
    assert served.session(4242).batches == 3  # only the good requests counted


def test_stream_scoped_session_ends_with_the_stream(served: Handle) -> None:
    client = served.client()
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for seed in range(3):  # no sequence id: one session scoped to this stream
            client.async_stream_infer("demo", [infer_input(images(2, seed))])
        assert all(results.get(timeout=30)[1] is None for _ in range(3))
        scoped = [s for s in served.engine().sessions.live() if s.sequence_id.scoped]
        assert len(scoped) == 1 and scoped[0].batches == 3
    finally:
        client.stop_stream()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(
        s.sequence_id.scoped for s in served.engine().sessions.live()
    ):
        time.sleep(0.05)
    assert not any(s.sequence_id.scoped for s in served.engine().sessions.live())


def test_oversized_message_is_resource_exhausted() -> None:
    with running_server(max_message_bytes=1 << 20) as handle:
        x = images(400)  # 1.25 MB
        with pytest.raises(InferenceServerException) as err:
            handle.client().infer("demo", [infer_input(x)])
        assert "RESOURCE_EXHAUSTED" in str(err.value.status())


def test_graceful_shutdown_finishes_in_flight_requests() -> None:
    with running_server() as handle:
        model = handle.server.repository.get("demo")
        release = threading.Event()
        model._executor.submit(release.wait)  # keep the worker busy
        with grpc.insecure_channel(handle.url) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            client = handle.client()
            pending: queue.Queue = queue.Queue()
            client.async_infer("demo", [infer_input(images(4))],
                               callback=lambda result, error: pending.put((result, error)))
            time.sleep(0.3)  # the request is now queued behind the busy worker
            stopping = threading.Thread(target=lambda: handle.call(handle.server.stop(5.0)))
            stopping.start()
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            release.set()
            result, error = pending.get(timeout=10)
            stopping.join(10)
        assert error is None and result.as_numpy("logits").shape == (4, 10)


def key(sequence_id: int | str) -> SessionKey:
    """The engine key of an unauthenticated client's sequence (server/keys.py)."""
    return SessionKey("anonymous", sequence_id)
