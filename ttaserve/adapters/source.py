"""``source``: no adaptation. BatchNorm uses the source (training) statistics, so a
sample's output does not depend on the rest of its batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ttaserve.adapters.base import Normalization, StatelessNormalization, TensorState
from ttaserve.adapters.model import PreparedModel, normalizer
from ttaserve.adapters.registry import register


@dataclass(frozen=True)
class SourceParams:
    """The source policy has no parameters."""


@register
class Source:
    name: ClassVar[str] = "source"
    description: ClassVar[str] = "no adaptation: the model exactly as trained"
    Params: ClassVar[type] = SourceParams

    def __init__(self, params: SourceParams = SourceParams()) -> None:
        self.params = params

    def check(self, model: PreparedModel) -> None:
        """Any model can be served as is."""

    def init_state(self, model: PreparedModel) -> TensorState:
        return TensorState()

    def forward(
        self, model: PreparedModel, x: torch.Tensor, state: TensorState, adapt: bool = True
    ) -> torch.Tensor:
        with torch.no_grad(), normalizer(None):
            return model(x)

    def normalization(self, model: PreparedModel, state: TensorState, x: torch.Tensor) -> Normalization:
        """The source statistics (no hook): lets a source request share a forward pass with
        other requests (ttaserve/batching.py); samples never interact under them."""
        return StatelessNormalization(None)

    def signals(self, state: TensorState) -> dict[str, float]:
        return {}
