"""The resource attacks of issue 11 as functions over a server address, shared by the tests
(test_memory.py) and the measurement command (measure.py). Each is bounded in size and time
and returns what the server answered, by status code."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
_OPTIONS = [("grpc.max_send_message_length", 128 << 20), ("grpc.max_receive_message_length", 128 << 20)]


def _request(sequence_id: str | int = 0, pixels: int = 1, policy: str | None = None,
             padding: int = 0) -> bytes:
    request = service_pb2.ModelInferRequest(model_name="demo")
    request.inputs.add(name="input", datatype="FP32", shape=[pixels, 1, 28, 28])
    request.raw_input_contents.append(np.full((pixels, 1, 28, 28), 0.5, np.float32).tobytes())
    if isinstance(sequence_id, str):
        request.parameters["sequence_id"].string_param = sequence_id
    elif sequence_id:
        request.parameters["sequence_id"].int64_param = sequence_id
    if policy:
        request.parameters["tta_policy"].string_param = policy
    if padding:
        request.raw_input_contents.append(b"\0" * padding)  # a big body (refused later or never read)
    return request.SerializeToString()


def _fire(url: str, bodies: list[bytes], token: str | None, parallel: int) -> Counter[str]:
    codes: Counter[str] = Counter()
    lock = threading.Lock()
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(url, options=_OPTIONS) as channel:
        call: Callable[..., bytes] = channel.unary_unary(MODEL_INFER)

        def one(body: bytes) -> None:
            try:
                call(body, metadata=metadata, timeout=120)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            with lock:
                codes[code] += 1
        with ThreadPoolExecutor(parallel) as pool:
            list(pool.map(one, bodies))
    return codes


def unauthenticated_bodies(url: str, count: int = 16, size: int = 60 << 20) -> Counter[str]:
    """``count`` concurrent requests of ``size`` bytes without a token."""
    body = _request(padding=size)
    return _fire(url, [body] * count, None, count)


def long_sequence_ids(url: str, token: str | None, count: int = 300, size: int = 1 << 20) -> Counter[str]:
    """``count`` requests whose (distinct) sequence ids are ``size`` bytes long."""
    bodies = [_request(f"{i:08d}" + "x" * (size - 8)) for i in range(count)]
    return _fire(url, bodies, token, 4)


def session_flood(url: str, token: str | None, count: int, policy: str = "unmix-tns") -> Counter[str]:
    """``count`` new sessions of a policy with a large state (batch 1 each)."""
    return _fire(url, [_request(f"flood-{i}", policy=policy) for i in range(count)], token, 4)
