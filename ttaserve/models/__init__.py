"""The embedded demo models (weights ship inside the package; no download)."""

from __future__ import annotations

from importlib import resources

import torch

from ttaserve.models.resnet import CLASS_NAMES, DemoResNet

__all__ = ["CLASS_NAMES", "DemoResNet", "demo", "generalist", "weights_path"]


def weights_path(kind: str) -> str:
    return str(resources.files("ttaserve.models") / "weights" / f"{kind}.safetensors")


def _load(kind: str) -> DemoResNet:
    from safetensors.torch import load_file

    model = DemoResNet()
    model.load_state_dict(load_file(weights_path(kind)))
    return model.eval()


def demo() -> DemoResNet:
    """The demo classifier (expert): trained on clean Fashion-MNIST, eval mode.
    Input [B, 1, 28, 28] with pixels in [0, 1]; output logits [B, 10]."""
    return _load("expert")


def generalist() -> DemoResNet:
    """The demo model's twin trained with augmentations (the T3 generalist)."""
    return _load("generalist")


def load_state(model: torch.nn.Module, path: str) -> None:
    """Load a safetensors file or a torch state dict into ``model``."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
