"""Every policy served over a tritonclient stream gives sensible predictions on shifted data.

A sanity check of the serving path per policy (finite logits, far better than the 90 %
chance error on 256 noisy images); how good each policy is, is the accuracy benchmark's
job (docs/BENCHMARKS.md "Accuracy"): UnMix-TNS, for one, adapts slowly and is still worse than source
this early in a stream."""

from __future__ import annotations

import queue

import numpy as np
import pytest
import torch

from tests.server.conftest import Handle, infer_input
from ttaserve.adapters import policy_names
from ttaserve.data import load_split


@pytest.fixture(scope="module")
def shifted() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_split("test")
    gen = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(y), generator=gen)[:256]
    noisy = (x[pick] + 0.15 * torch.randn(x[pick].shape, generator=gen)).clamp(0, 1)
    return noisy.numpy(), y[pick].numpy()


@pytest.mark.parametrize("policy", policy_names())
def test_policy_stream_on_noisy_data(served: Handle, shifted: tuple, policy: str) -> None:
    x, y = shifted
    client = served.client()
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    predictions = []
    try:
        for i in range(0, len(x), 32):
            client.async_stream_infer("demo", [infer_input(x[i:i + 32])], sequence_id=f"noisy-{policy}",
                                      parameters={"tta_policy": policy})
            result, error = results.get(timeout=60)
            assert error is None, error
            logits = result.as_numpy("logits")
            assert np.isfinite(logits).all()
            predictions.append(logits.argmax(1))
    finally:
        client.stop_stream()
    error_rate = float((np.concatenate(predictions) != y).mean())
    assert error_rate < 0.8, f"{policy}: {error_rate:.1%} error on noisy data (chance is 90 %)"
