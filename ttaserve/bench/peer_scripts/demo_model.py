"""The demo model for the peer servers, loaded without importing the ttaserve package.

Runs inside the peers' virtualenv, which holds only torch, numpy and safetensors besides
the servers, so the architecture file and the weights come by path through the
environment (set by ttaserve.bench.peers): TTASERVE_PEER_RESNET, TTASERVE_PEER_WEIGHTS,
TTASERVE_PEER_THREADS, and TTASERVE_PEER_CHANNELS_LAST=1 to run it in the channels-last
memory layout ttaserve runs convolutional models in (the same forward for every server).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch
from safetensors.torch import load_file


def load() -> torch.nn.Module:
    """The demo classifier in eval mode, with the same torch thread count as ttaserve."""
    threads = int(os.environ.get("TTASERVE_PEER_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    spec = importlib.util.spec_from_file_location("demo_resnet", os.environ["TTASERVE_PEER_RESNET"])
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    model = module.DemoResNet()
    model.load_state_dict(load_file(os.environ["TTASERVE_PEER_WEIGHTS"]))
    if _CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    return model.eval()


_CHANNELS_LAST = os.environ.get("TTASERVE_PEER_CHANNELS_LAST") == "1"


def predict(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """Logits [B, 10] float32 for images [B, 1, 28, 28] float32."""
    x = torch.from_numpy(images)
    if _CHANNELS_LAST:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return model(x).numpy()
