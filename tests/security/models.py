"""Models for the security suite, importable by a server's model repository."""

from __future__ import annotations

import time

import torch

from ttaserve.models import demo
from ttaserve.models.resnet import DemoResNet

SLOW_FORWARD_S = 0.6


class SlowResNet(DemoResNet):
    """The demo model, with every forward pass taking at least SLOW_FORWARD_S: long enough
    to hold a session's lock while the test probes the server."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(SLOW_FORWARD_S)
        return super().forward(x)


def slow_demo() -> DemoResNet:
    model = demo()
    model.__class__ = SlowResNet
    return model
