"""Caps: past each one the answer is immediate, names the cap and changes nothing."""

from __future__ import annotations

import queue
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.server.conftest import Handle, images, infer_input, running_server


def _request(sequence_id: int, n: int = 2, timeout_us: int = 0) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="demo")
    request.inputs.add(name="input", datatype="FP32", shape=[n, 1, 28, 28])
    request.raw_input_contents.append(images(n).tobytes())
    request.parameters["sequence_id"].int64_param = sequence_id
    if timeout_us:
        request.parameters["timeout"].int64_param = timeout_us
    return request


def _busy(handle: Handle) -> threading.Event:
    """Occupy the demo model's worker until the returned event is set."""
    release = threading.Event()
    handle.server.repository.get("demo")._executor.submit(release.wait)
    return release


def _call_async(stub: service_pb2_grpc.GRPCInferenceServiceStub, request: object,
                out: queue.Queue, timeout: float | None = 30) -> None:
    def run() -> None:
        try:
            out.put(stub.ModelInfer(request, timeout=timeout))
        except grpc.RpcError as exc:
            out.put(exc)
    threading.Thread(target=run, daemon=True).start()


def _wait_for(condition, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_queue_cap_refuses_with_resource_exhausted() -> None:
    with running_server(max_queue=1) as handle, grpc.insecure_channel(handle.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        model = handle.server.repository.get("demo")
        release = _busy(handle)
        first: queue.Queue = queue.Queue()
        _call_async(stub, _request(1), first)
        _wait_for(lambda: model.pending == 1)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(_request(2), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-queue=1" in err.value.details()
        assert handle.session(2) is None
        release.set()
        assert not isinstance(first.get(timeout=30), Exception)
        text = urllib.request.urlopen(handle.metrics_url, timeout=10).read().decode()
        assert 'ttaserve_rejected_total{cap="max_queue",model="demo"} 1.0' in text


def test_timeout_parameter_expires_queued_request_without_running_it() -> None:
    with running_server() as handle, grpc.insecure_channel(handle.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        release = _busy(handle)
        late: queue.Queue = queue.Queue()
        _call_async(stub, _request(5, timeout_us=100_000), late)  # Triton's 'timeout', in µs
        time.sleep(0.4)
        release.set()
        outcome = late.get(timeout=30)
        assert isinstance(outcome, grpc.RpcError)
        assert outcome.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "was not run" in outcome.details()
        assert handle.session(5) is None


def test_client_deadline_is_honoured_in_the_queue() -> None:
    with running_server() as handle, grpc.insecure_channel(handle.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        release = _busy(handle)
        late: queue.Queue = queue.Queue()
        _call_async(stub, _request(6), late, timeout=0.2)
        outcome = late.get(timeout=30)
        assert outcome.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        release.set()
        stub.ModelInfer(_request(7), timeout=30)  # the worker has drained the late one
        assert handle.session(6) is None


def test_concurrent_rpc_cap_refuses_and_health_still_answers() -> None:
    with running_server(max_concurrent_rpcs=2) as handle:
        clients = [handle.client() for _ in range(2)]
        results: queue.Queue = queue.Queue()
        try:
            for i, client in enumerate(clients):  # two streams hold both slots
                client.start_stream(callback=lambda result, error: results.put(error))
                client.async_stream_infer("demo", [infer_input(images(2))], sequence_id=100 + i)
            assert [results.get(timeout=30) for _ in clients] == [None, None]
            with pytest.raises(InferenceServerException) as err:
                handle.client().infer("demo", [infer_input(images(2))])
            assert "RESOURCE_EXHAUSTED" in str(err.value.status())
            assert "--max-concurrent-rpcs" in str(err.value.message())
            with grpc.insecure_channel(handle.url) as channel:
                health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                assert health.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            for client in clients:
                client.stop_stream()
        _wait_for(lambda: handle.client().infer("demo", [infer_input(images(2))]) is not None)


def test_batch_over_the_cap_is_resource_exhausted(served: Handle) -> None:
    x = np.zeros((300, 1, 28, 28), np.float32)
    with pytest.raises(InferenceServerException) as err:
        served.client().infer("demo", [infer_input(x)], sequence_id=77)
    assert "RESOURCE_EXHAUSTED" in str(err.value.status())
    assert "--max-batch-size=256" in str(err.value.message())
    assert served.session(77) is None


def test_garbage_bytes_are_invalid_argument(served: Handle) -> None:
    with grpc.insecure_channel(served.url) as channel:
        unary = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as err:
            unary(b"\xff\xff\xff\x07not a protobuf", timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid protobuf" in err.value.details()
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        good = _request(0).SerializeToString()
        responses = stream(iter([good, b"\xff\xff\xff\x07garbage", good]), timeout=30)
        first = service_pb2.ModelStreamInferResponse.FromString(next(responses))
        assert first.error_message == "" and first.infer_response.outputs
        with pytest.raises(grpc.RpcError) as err:
            list(responses)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerLive(
            service_pb2.ServerLiveRequest()).live


def test_draining_server_answers_unavailable() -> None:
    with running_server() as handle:
        client = handle.client()
        client.infer("demo", [infer_input(images(2))])
        handle.server.inference.draining = True  # the first step of Server.stop()
        with pytest.raises(InferenceServerException) as err:
            client.infer("demo", [infer_input(images(2))])
        assert "UNAVAILABLE" in str(err.value.status())
        handle.server.inference.draining = False
