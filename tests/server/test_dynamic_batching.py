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
