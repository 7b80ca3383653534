"""``alpha-bn`` (and ``tbn``): test-time batch statistics calibration.

Implemented from the paper: You, Li, Zhao, "Test-time Batch Statistics Calibration for
Covariate Shift" (2021). Each BatchNorm2d layer normalizes with

    m = alpha * mu_source + (1 - alpha) * mu_batch
    v = alpha * var_source + (1 - alpha) * var_batch

where **alpha is the weight of the source statistics**: alpha = 1 is ``source``, alpha = 0
is plain test-batch normalization (``tbn``). Some benchmark code names the *test* weight
"alpha"; its 0.1 is our alpha = 0.9. Batch statistics are biased and taken over (B, H, W)
of the request's own batch, so at batch size 1 they are the sample's instance statistics.
Stateless across batches; no backward pass; train/eval mode make no difference.

Default alpha = 0.1 (90 % batch statistics) was chosen on the accuracy benchmark's
validation split (training images, severity 4; docs/BENCHMARKS.md "Accuracy"): the largest alpha whose
i.i.d. error at batch 64 and 16 stays within 1 point of the best (alpha = 0). The paper's
"Core" loss is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ttaserve.adapters.base import (
    Normalization,
    StatelessNormalization,
    TensorState,
    run_normalized,
)
from ttaserve.adapters.model import AdaptiveBatchNorm2d, NormHook, PreparedModel, observed_moments
from ttaserve.adapters.registry import bounds, register, register_alias
from ttaserve.kernels.norm import per_sample
from ttaserve.kernels.reference import alpha_bn_with
from ttaserve.kernels.select import implementation

# The whole layer (statistics, mixing, normalization) is one kernel: fused on CUDA.
_alpha_bn = implementation("alpha_bn")


@dataclass(frozen=True)
class AlphaBNParams:
    alpha: float = field(default=0.1, metadata=bounds(0.0, 1.0))  # weight of the source statistics, in [0, 1]

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (weight of the source statistics), got {self.alpha}")


@dataclass(frozen=True)
class AlphaBNNorm:
    """The per-layer normalizer of one forward pass. A value rather than a closure, so that
    a backend which runs its own graph (ONNX Runtime) can read alpha and the segments."""

    alpha: float
    offsets: tuple[int, ...] | None = None  # request segments of a shared batch, or None

    def __call__(self, layer: AdaptiveBatchNorm2d, z: torch.Tensor) -> torch.Tensor:
        offsets = list(self.offsets) if self.offsets is not None else None
        seen = observed_moments(z)  # the drift observer's moments of this input, bit-identical
        if seen is None:
            return _alpha_bn(z, offsets, layer.running_mean, layer.running_var, self.alpha,
                             layer.weight, layer.bias, layer.eps)
        mean, var = seen if offsets is None else (per_sample(seen[0], offsets), per_sample(seen[1], offsets))
        return alpha_bn_with(z, mean, var, layer.running_mean, layer.running_var, self.alpha,
                             layer.weight, layer.bias, layer.eps)


def alpha_bn_norm(alpha: float, offsets: list[int] | None = None) -> NormHook:
    """The per-layer normalizer for one forward pass. With ``offsets`` the batch is made of
    several requests, and each request segment is normalized with its own batch statistics."""
    return AlphaBNNorm(alpha, tuple(offsets) if offsets is not None else None)


@register
class AlphaBN:
    name: ClassVar[str] = "alpha-bn"
    description: ClassVar[str] = (
        "mix source and test-batch BN statistics with source weight alpha (You et al. 2021)"
    )
    Params: ClassVar[type] = AlphaBNParams

    def __init__(self, params: AlphaBNParams = AlphaBNParams()) -> None:
        self.params = params

    def check(self, model: PreparedModel) -> None:
        model.require_batchnorm(self.name)

    def init_state(self, model: PreparedModel) -> TensorState:
        return TensorState()

    def normalization(self, model: PreparedModel, state: TensorState, x: torch.Tensor) -> Normalization:
        return StatelessNormalization(alpha_bn_norm(self.params.alpha))

    def forward(
        self, model: PreparedModel, x: torch.Tensor, state: TensorState, adapt: bool = True
    ) -> torch.Tensor:
        return run_normalized(self.normalization(model, state, x), model, x, adapt)

    def signals(self, state: TensorState) -> dict[str, float]:
        return {}


register_alias("tbn", "alpha-bn", alpha=0.0)
