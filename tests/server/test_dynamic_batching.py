"""With --batch-delay-us, requests of different sessions share forward passes, and each
response still equals what that session gets alone (to float rounding, see batching.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from tests.server.conftest import images, infer_input, running_server
from ttaserve import Engine
from ttaserve.models import demo


def test_concurrent_sequences_are_batched_and_isolated() -> None:
    batches = {sid: [images(8, seed=10 * sid + k) * (0.2 + 0.1 * sid) for k in range(3)] for sid in range(1, 9)}
    with running_server(batch_delay_us=50_000) as handle:
        def run(sid: int) -> list[np.ndarray]:
            client = handle.client()
            return [client.infer("demo", [infer_input(x)], sequence_id=sid,
                                 parameters={"tta_policy": "tbn"}).as_numpy("logits") for x in batches[sid]]

        with ThreadPoolExecutor(8) as pool:
            got = dict(zip(batches, pool.map(run, batches)))
        stats = handle.client().get_inference_statistics("demo", as_json=True)["model_stats"][0]
    assert int(stats["execution_count"]) < 24  # some requests shared a forward pass
    assert int(stats["inference_count"]) == 8 * 3 * 8
    reference = Engine(demo(), "tbn")
    for sid, outs in got.items():
        for x, out in zip(batches[sid], outs):
            np.testing.assert_allclose(out, reference.predict(torch.from_numpy(x)).numpy(), rtol=0, atol=1e-5)


def test_default_policy_sessions_share_passes_and_match_alone() -> None:
    """Sessions of the server's default policy (graded-bn, safety net on) are batched too,
    and every response equals that session run alone in an engine."""
    batches = {sid: [images(8, seed=100 + 10 * sid + k) * (0.3 + 0.1 * sid) for k in range(3)] for sid in range(1, 7)}
    with running_server(batch_delay_us=50_000) as handle:
        def run(sid: int) -> list[tuple[np.ndarray, str]]:
            client = handle.client()
            out = []
            for x in batches[sid]:
                result = client.infer("demo", [infer_input(x)], sequence_id=sid)
                out.append((result.as_numpy("logits"), result.get_response().parameters["tta_policy"].string_param))
            return out

        with ThreadPoolExecutor(6) as pool:
            got = dict(zip(batches, pool.map(run, batches)))
        stats = handle.client().get_inference_statistics("demo", as_json=True)["model_stats"][0]
    assert int(stats["execution_count"]) < 18  # some requests shared a forward pass
    reference = Engine(demo(), "graded-bn")
    for sid, outs in got.items():
        for x, (out, policy) in zip(batches[sid], outs):
            expected = reference.predict(torch.from_numpy(x), session=sid)
            np.testing.assert_allclose(out, expected.numpy(), rtol=0, atol=1e-5)
            assert policy == "graded-bn"


def test_a_request_without_sequence_gets_the_policy_it_names() -> None:
    """tta_policy=tbn without a sequence id, batched or not: tbn's logits, and the response
    names the policy that answered (tbn is alpha-bn with alpha=0)."""
    x = images(8, seed=3) * 0.4
    with running_server(batch_delay_us=20_000, policy="source") as handle:
        result = handle.client().infer("demo", [infer_input(x)], parameters={"tta_policy": "tbn"})
    expected = Engine(demo(), "tbn").predict(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=0, atol=1e-5)
    assert result.get_response().parameters["tta_policy"].string_param == "alpha-bn"
