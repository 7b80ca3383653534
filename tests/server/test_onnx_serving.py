"""An ONNX model served by ONNX Runtime, called with the stock tritonclient: a stream
carrying two sequences with different policies gives what the torch model gives."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from tritonclient.utils import InferenceServerException

from tests.server.conftest import Handle, infer_input, running_server
from ttaserve import Engine
from ttaserve.models import demo

MODEL = "demo-onnx"


@pytest.fixture(scope="module")
def onnx_served(demo_onnx_repo: Path) -> Iterator[Handle]:
    with running_server(model_repository=str(demo_onnx_repo)) as handle:
        yield handle


def _shifted(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = 0.5 + 0.4 * (rng.random((n, 1, 28, 28), dtype=np.float32) - 0.5) + rng.normal(0, 0.2, (n, 1, 28, 28))
    return np.clip(x, 0, 1).astype(np.float32)


def test_metadata_names_the_onnx_runtime_platform(onnx_served: Handle) -> None:
    client = onnx_served.client()
    assert client.get_model_metadata(MODEL).platform == "onnxruntime_onnx"
    config = client.get_model_config(MODEL).config
    assert config.platform == "onnxruntime_onnx" and config.HasField("sequence_batching")


def test_stream_of_two_sequences_matches_the_torch_model(onnx_served: Handle) -> None:
    policies = {7: "unmix-tns", "cam-b": "tbn"}
    batches = {sid: [_shifted(8, 10 * i + k) for k in range(4)] for i, sid in enumerate(policies)}
    client = onnx_served.client()
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for k in range(4):  # interleaved: each request of one sequence, then the other's
            for sid, policy in policies.items():
                client.async_stream_infer(MODEL, [infer_input(batches[sid][k])], sequence_id=sid,
                                          request_id=f"{sid}/{k}",
                                          sequence_start=k == 0, sequence_end=k == 3,
                                          parameters={"tta_policy": policy} if k == 0 else {})
        got = [results.get(timeout=60) for _ in range(8)]
    finally:
        client.stop_stream()
    assert all(error is None for _, error in got)
    by_id = {result.get_response().id: result for result, _ in got}
    engines = {sid: Engine(demo(), policy) for sid, policy in policies.items()}
    for k in range(4):
        for sid in policies:
            result = by_id[f"{sid}/{k}"]
            expected = engines[sid].predict(torch.from_numpy(batches[sid][k]), session="s").numpy()
            np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=0, atol=1e-4)
    assert len(onnx_served.engine(MODEL).sessions) == 0  # both sequences ended


@pytest.mark.parametrize("policy", ["tent", "ecotta", "t3"])
def test_unsupported_policies_answer_unimplemented(onnx_served: Handle, policy: str) -> None:
    client = onnx_served.client()
    with pytest.raises(InferenceServerException, match="not available for a model served by ONNX Runtime") as err:
        client.infer(MODEL, [infer_input(_shifted(2, 0))], sequence_id=99, sequence_start=True,
                     parameters={"tta_policy": policy})
    assert "UNIMPLEMENTED" in str(err.value.status())
    assert onnx_served.engine(MODEL).sessions.get(99) is None


def test_a_server_default_the_onnx_model_cannot_run_leaves_it_on_source(demo_onnx_repo: Path) -> None:
    # (A policy the model's own config.json names is refused at load: tests/handlers/test_onnx.py.)
    with running_server(model_repository=str(demo_onnx_repo), policy="tent") as handle:
        assert handle.engine("demo").default.name == "tent"
        assert handle.engine(MODEL).default.name == "source"  # with a warning in the log
