"""The embedded demo models (weights ship inside the package; no download)."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import Any

import torch

from ttaserve.models.resnet import CLASS_NAMES, DemoResNet

__all__ = ["CLASS_NAMES", "DemoResNet", "demo", "demo_artifacts", "generalist", "load_tensors", "weights_path"]


def weights_path(kind: str) -> str:
    return str(resources.files("ttaserve.models") / "weights" / f"{kind}.safetensors")


def _load(kind: str) -> DemoResNet:
    from safetensors.torch import load_file

    model = DemoResNet()
    model.load_state_dict(load_file(weights_path(kind)))
    return model.eval()


def load_tensors(name: str) -> dict[str, torch.Tensor]:
    """A shipped tensor file ``weights/<name>.safetensors`` as a dict."""
    from safetensors.torch import load_file

    return load_file(weights_path(name))


def _prepared_generalist() -> Any:
    from ttaserve.adapters.model import prepare

    return prepare(generalist())


def demo_artifacts() -> dict[str, Callable[[], Any]]:
    """Lazy loaders of the demo model's policy artifacts (run on first use)."""
    return {
        "adanpc.memory": lambda: load_tensors("adanpc_memory"),
        "ecotta.meta": lambda: load_tensors("ecotta_meta"),
        "t3.generalist": _prepared_generalist,
    }


def demo() -> DemoResNet:
    """The demo classifier (expert): trained on clean Fashion-MNIST, eval mode.
    Input [B, 1, 28, 28] with pixels in [0, 1]; output logits [B, 10].
    It carries the loaders of its policy artifacts (``ttaserve_artifacts``), so
    ``Engine(demo(), policy=...)`` works for every policy."""
    model = _load("expert")
    model.ttaserve_artifacts = demo_artifacts()  # type: ignore[assignment]
    return model


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
