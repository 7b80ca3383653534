"""Property-based fuzzing of ModelInferRequest contents against a live server: every
answer is OK or a client error with a message (never INTERNAL/UNKNOWN), and the server
stays healthy."""

from __future__ import annotations

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.server.conftest import Handle

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED}
PARAM_NAMES = ["sequence_id", "sequence_start", "sequence_end", "tta_policy", "tta_adapt",
               "timeout", "priority", "triton_x", "tta_unknown", "custom"]
PARAM_VALUES = st.one_of(
    st.tuples(st.just("bool_param"), st.booleans()),
    st.tuples(st.just("int64_param"), st.integers(-2**63, 2**63 - 1)),
    st.tuples(st.just("uint64_param"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("double_param"), st.floats(allow_nan=True)),
    st.tuples(st.just("string_param"), st.sampled_from(["", "tent", "alpha-bn", "nope", "é\x00"])),
)
VALUES = st.sampled_from([0.0, 0.5, 1.0, -1.0, 2.0, float("nan"), float("inf")])


def _base(draw: st.DrawFn) -> service_pb2.ModelInferRequest:
    """A valid request of random batch size, values and parameters."""
    request = service_pb2.ModelInferRequest(model_name="demo")
    n = draw(st.integers(1, 4))
    request.inputs.add(name="input", datatype="FP32", shape=[n, 1, 28, 28])
    rng = np.random.default_rng(draw(st.integers(0, 9)))
    scale = draw(st.sampled_from([0.0, 0.01, 1.0]))
    request.raw_input_contents.append((rng.random((n, 1, 28, 28), dtype=np.float32) * scale).tobytes())
    request.parameters["sequence_id"].int64_param = draw(st.integers(0, 5))
    if draw(st.booleans()):
        request.parameters["tta_policy"].string_param = draw(st.sampled_from(["tent", "alpha-bn", "source"]))
    for name in ("sequence_start", "sequence_end", "tta_adapt"):
        if draw(st.integers(0, 3)) == 0:
            request.parameters[name].bool_param = draw(st.booleans())
    return request


def _mutate(draw: st.DrawFn, request: service_pb2.ModelInferRequest) -> None:
    kind = draw(st.sampled_from(["model", "version", "name", "datatype", "shape", "raw", "typed",
                                 "values", "param", "extra", "output"]))
    tensor = request.inputs[0]
    if kind == "model":
        request.model_name = draw(st.sampled_from(["nope", "", "DEMO"]))
    elif kind == "version":
        request.model_version = draw(st.sampled_from(["1", "x", "-1"]))
    elif kind == "name":
        tensor.name = draw(st.sampled_from(["x", "", "input "]))
    elif kind == "datatype":
        tensor.datatype = draw(st.sampled_from(["FP64", "UINT8", "BYTES", "zz", ""]))
    elif kind == "shape":
        tensor.ClearField("shape")
        tensor.shape.extend(draw(st.lists(st.integers(-2**40, 2**40), max_size=5)))
    elif kind == "raw":
        request.ClearField("raw_input_contents")
        request.raw_input_contents.append(draw(st.binary(max_size=64)))
    elif kind == "typed":
        request.ClearField("raw_input_contents")
        count = draw(st.sampled_from([0, 784, 1568]))
        tensor.contents.fp32_contents.extend([draw(VALUES)] * count)
    elif kind == "values":
        # An earlier "shape" mutation may have left no dimensions, or a batch that cannot be
        # allocated; then the values go in one image's worth (the shape error is the answer).
        n = int(tensor.shape[0]) if len(tensor.shape) and 1 <= tensor.shape[0] <= 4 else 1
        request.ClearField("raw_input_contents")
        request.raw_input_contents.append(np.full((n, 1, 28, 28), draw(VALUES), np.float32).tobytes())
    elif kind == "param":
        kind_, value = draw(PARAM_VALUES)
        setattr(request.parameters[draw(st.sampled_from(PARAM_NAMES))], kind_, value)
    elif kind == "extra":
        request.inputs.add(name=draw(st.sampled_from(["input", "y"])), datatype="FP32", shape=[1, 1, 28, 28])
    else:
        request.outputs.add(name=draw(st.sampled_from(["logits", "probs", ""])))


@st.composite
def requests(draw: st.DrawFn) -> service_pb2.ModelInferRequest:
    request = _base(draw)
    for _ in range(draw(st.integers(0, 2))):
        _mutate(draw, request)
    return request


# derandomize: the same 150 requests in every run and every clone; database=None: no
# .hypothesis/ folder whose saved examples would replay in later runs.
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True, database=None)
@given(request=requests())
def test_fuzzed_requests_get_client_errors_only(served: Handle, request: service_pb2.ModelInferRequest) -> None:
    with grpc.insecure_channel(served.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ModelInfer(request, timeout=60)
            code, details = grpc.StatusCode.OK, "ok"
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
        assert code in ALLOWED, (code, details)
        assert details
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
