"""The Triton-compatible API through the stock tritonclient, against a real grpc.aio server."""

from __future__ import annotations

import queue

import numpy as np
import pytest
import torch
from tritonclient.utils import InferenceServerException

from tests.server.conftest import Handle, images, infer_input, running_server
from ttaserve import Engine
from ttaserve.adapters import DEFAULT_POLICY
from ttaserve.models import CLASS_NAMES, demo
from ttaserve.server.keys import SessionKey


def test_health_and_metadata(served: Handle) -> None:
    client = served.client()
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("demo")
    assert not client.is_model_ready("no-such-model")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "ttaserve"
    assert {"sequence", "sequence(string_id)", "statistics", "parameters"} <= set(meta["extensions"])
    model = client.get_model_metadata("demo", as_json=True)
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "1", "28", "28"]}]
    assert model["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]}]


def test_model_config_declares_sequence_batching_and_labels(served: Handle) -> None:
    config = served.client().get_model_config("demo", as_json=True)["config"]
    assert "sequence_batching" in config
    assert config["max_batch_size"] > 0
    assert config["input"][0]["dims"] == ["1", "28", "28"]
    assert config["parameters"]["labels"]["string_value"].split(",") == list(CLASS_NAMES)


def test_unary_infer_equals_in_process_engine(served: Handle) -> None:
    x = images(16)
    result = served.client().infer("demo", [infer_input(x)])
    expected = Engine(demo(), DEFAULT_POLICY).predict(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(result.as_numpy("logits"), expected)


@pytest.mark.parametrize("policy", ["tbn", "alpha-bn"])
def test_tta_policy_parameter_selects_the_policy(served: Handle, policy: str) -> None:
    x = images(8, seed=3)
    result = served.client().infer(
        "demo", [infer_input(x)], sequence_id=900 + len(policy), sequence_start=True,
        sequence_end=True, parameters={"tta_policy": policy},
    )
    expected = Engine(demo(), policy).predict(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(result.as_numpy("logits"), expected)


def test_sequence_lifecycle(served: Handle) -> None:
    client, sessions = served.client(), served.engine().sessions
    x = infer_input(images(4))
    client.infer("demo", [x], sequence_id=41, sequence_start=True, parameters={"tta_policy": "tbn"})
    assert sessions.get(key(41)).policy == "alpha-bn" and sessions.get(key(41)).batches == 1
    client.infer("demo", [x], sequence_id=41)
    assert sessions.get(key(41)).batches == 2
    client.infer("demo", [x], sequence_id=41, sequence_start=True)  # restart: a fresh session
    assert sessions.get(key(41)).batches == 1
    client.infer("demo", [x], sequence_id=41, sequence_end=True)
    assert sessions.get(key(41)) is None
    client.infer("demo", [x], sequence_id="camera-7")  # an unseen (string) id starts a session
    assert sessions.get(key("camera-7")).batches == 1
    client.infer("demo", [x])  # no sequence id: nothing kept
    assert sessions.get(key(0)) is None


def test_tta_adapt_false_leaves_state_unchanged(served: Handle) -> None:
    client, sessions = served.client(), served.engine().sessions
    x = infer_input(images(4))
    client.infer("demo", [x], sequence_id=77, sequence_start=True)
    before = sessions.get(key(77)).state.state_dict()
    client.infer("demo", [x], sequence_id=77, parameters={"tta_adapt": False})
    after = sessions.get(key(77)).state.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_policy_cannot_change_mid_sequence(served: Handle) -> None:
    client = served.client()
    x = infer_input(images(2))
    client.infer("demo", [x], sequence_id=55, sequence_start=True, parameters={"tta_policy": "tbn"})
    with pytest.raises(InferenceServerException, match="first request") as err:
        client.infer("demo", [x], sequence_id=55, parameters={"tta_policy": "source"})
    assert "INVALID_ARGUMENT" in str(err.value.status())


def test_stream_carries_several_sequences(served: Handle) -> None:
    client = served.client()
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        batches = {1001: images(4, 1), "cam-b": images(4, 2), 1003: images(4, 3)}
        for sid, x in batches.items():
            client.async_stream_infer("demo", [infer_input(x)], sequence_id=sid,
                                      parameters={"tta_policy": "tbn"})
        got = [results.get(timeout=30) for _ in batches]
    finally:
        client.stop_stream()
    engine = Engine(demo(), "tbn")
    for x, (result, error) in zip(batches.values(), got):
        assert error is None
        np.testing.assert_array_equal(result.as_numpy("logits"),
                                      engine.predict(torch.from_numpy(x)).numpy())


def test_statistics_and_repository_index(served: Handle) -> None:
    client = served.client()
    client.infer("demo", [infer_input(images(3))])
    stats = client.get_inference_statistics("demo", as_json=True)["model_stats"][0]
    assert int(stats["inference_count"]) >= 3 and int(stats["execution_count"]) >= 1
    index = client.get_model_repository_index(as_json=True)
    assert {"name": "demo", "version": "1", "state": "READY"} in index["models"]


def test_strict_sequences_need_a_start() -> None:
    with running_server(strict_sequences=True) as handle:
        client = handle.client()
        x = infer_input(images(2))
        with pytest.raises(InferenceServerException, match="sequence_start"):
            client.infer("demo", [x], sequence_id=5)
        client.infer("demo", [x], sequence_id=5, sequence_start=True)
        client.infer("demo", [x], sequence_id=5)


def test_idle_sessions_expire() -> None:
    import time

    with running_server(session_idle_s=0.2) as handle:
        handle.client().infer("demo", [infer_input(images(2))], sequence_id=8)
        sessions = handle.engine().sessions
        assert sessions.get(key(8)) is not None
        time.sleep(0.3)
        assert sessions.expire_idle() == 1 and sessions.get(key(8)) is None


def test_typed_contents_are_accepted(served: Handle) -> None:
    """Clients that send InferTensorContents instead of raw bytes get the same answer."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    x = images(2)
    request = service_pb2.ModelInferRequest(model_name="demo")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(served.url) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    logits = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 10)
    np.testing.assert_array_equal(logits, Engine(demo(), DEFAULT_POLICY).predict(torch.from_numpy(x)).numpy())


def key(sequence_id: int | str) -> SessionKey:
    """The engine key of an unauthenticated client's sequence (server/keys.py)."""
    return SessionKey("anonymous", sequence_id)
