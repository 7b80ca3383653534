"""The demo architecture: a small ResNet with BatchNorm for 28x28 gray images.

Input normalization lives inside the module, so callers send pixels in [0, 1].
The module exposes ``stem``, ``stages`` and ``head`` so that policies which need the
network's structure (EcoTTA partitions, AdaNPC features, T3 merging) can find it.
"""

from __future__ import annotations

import torch
from torch import nn

# Fashion-MNIST training-set pixel mean / std (computed once from the idx files).
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Normalize(nn.Module):
    """Maps [0, 1] pixels to the standardized range the network was trained on."""

    def __init__(self, mean: float = PIXEL_MEAN, std: float = PIXEL_STD) -> None:
        super().__init__()
        self.mean = mean
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class DemoResNet(nn.Module):
    """stem (conv-BN-ReLU) -> 3 stages of BasicBlocks -> global pool -> linear head."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), num_classes: int = 10) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Sequential(
            Normalize(), nn.Conv2d(1, w1, 3, 1, 1, bias=False), nn.BatchNorm2d(w1), nn.ReLU()
        )
        self.stages = nn.ModuleList(
            [
                BasicBlock(w1, w1),
                nn.Sequential(BasicBlock(w1, w2, 2), BasicBlock(w2, w2)),
                BasicBlock(w2, w3, 2),
            ]
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(w3, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.pool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
