"""Triton Inference Server (bundled by nvidia-pytriton) serving the demo model as "demo".

Usage: python triton_peer.py GRPC_PORT HTTP_PORT METRICS_PORT. Triton's defaults apply
(one model instance, dynamic batcher); max_batch_size matches ttaserve's default (256) so
Triton may merge concurrent requests just as it would in production.
"""

from __future__ import annotations

import sys

import demo_model
import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def main() -> None:
    grpc_port, http_port, metrics_port = (int(a) for a in sys.argv[1:4])
    model = demo_model.load()

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {"logits": demo_model.predict(model, inputs["input"])}

    config = TritonConfig(
        grpc_address="127.0.0.1", grpc_port=grpc_port, http_address="127.0.0.1",
        http_port=http_port, metrics_port=metrics_port,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name="demo",
            infer_func=infer,
            inputs=[Tensor(name="input", dtype=np.float32, shape=(1, 28, 28))],
            outputs=[Tensor(name="logits", dtype=np.float32, shape=(10,))],
            config=ModelConfig(max_batch_size=256),
        )
        print("peer ready", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
