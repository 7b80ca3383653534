"""Shared fixtures: tiny models built in milliseconds, the demo model, seeded data."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import ttaserve.adapters  # noqa: F401  (registers every policy)
from ttaserve.adapters import PreparedModel, prepare


class TinyNet(nn.Module):
    """conv-BN-ReLU x2 -> pool -> linear: the smallest model with the demo's structure."""

    def __init__(self, channels: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.stages = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())]
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(self.pool(x))


def randomize_bn(net: nn.Module) -> nn.Module:
    """Give every BatchNorm2d non-trivial running statistics and affine parameters (seeded
    by the caller's torch.manual_seed); returns the net in eval mode."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def make_tiny(seed: int = 0, channels: int = 4, num_classes: int = 3) -> TinyNet:
    """A TinyNet with random weights and non-trivial BN running statistics."""
    torch.manual_seed(seed)
    return randomize_bn(TinyNet(channels, num_classes))  # type: ignore[return-value]


@pytest.fixture
def tiny() -> PreparedModel:
    return prepare(make_tiny())


@pytest.fixture(scope="session")
def demo_module() -> nn.Module:
    from ttaserve.models import demo

    return demo()


@pytest.fixture
def images() -> torch.Tensor:
    """A seeded batch of 8 random 1x12x12 images."""
    return torch.rand(8, 1, 12, 12, generator=torch.Generator().manual_seed(1))


EXAMPLE_POLICY = Path(__file__).resolve().parents[1] / "examples" / "prior_shift.py"


@pytest.fixture
def example_policy() -> Iterator[str]:
    """examples/prior_shift.py loaded (which registers it, as a module in ttaserve/adapters/
    would be) for one test; yields its policy name and unregisters it afterwards."""
    from ttaserve.adapters.registry import unregister

    spec = importlib.util.spec_from_file_location("prior_shift_example", EXAMPLE_POLICY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through it
    try:
        spec.loader.exec_module(module)
        yield module.PriorShift.name
        unregister(module.PriorShift.name)
    finally:
        del sys.modules[spec.name]


@pytest.fixture(scope="session")
def demo_onnx_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding ``demo-onnx``: the demo model written by
    ``ttaserve export-onnx`` (ONNX file, config.json, AdaNPC memory)."""
    from ttaserve.cli import main

    root = tmp_path_factory.mktemp("onnx-repo")
    assert main(["export-onnx", "--out", str(root / "demo-onnx" / "model.onnx")]) == 0
    return root
