"""``tent``: fully test-time adaptation by entropy minimization (baseline).

Implemented from the paper: Wang, Shelhamer, Liu, Olshausen, Darrell, "Tent: Fully
Test-Time Adaptation by Entropy Minimization" (ICLR 2021). Every BatchNorm2d layer
normalizes with the statistics of the current test batch (biased variance over B, H, W,
as train-mode BN does); only the BN affine parameters gamma, beta are trained, by
minimizing the mean Shannon entropy of the softmax predictions with Adam. The logits
returned for a batch are those of the forward pass *before* the update (predict first,
then adapt), so a batch's output never depends on its own gradient step.

Choices (the shared model is frozen and served to many sessions at once, so nothing is
trained in place):

- Per-session state: a copy of every BN layer's gamma and beta initialised from the
  source affine, Adam's first and second moments for each, the Adam step counter and the
  last batch's mean entropy (for drift metrics), all plain tensors in the TensorState.
- Adam is implemented by hand on those tensors (no ``torch.optim`` object, whose state
  could not be snapshotted as plain tensors): the textbook update with bias correction,
  ``eps = 1e-8`` and no weight decay, the same arithmetic as ``torch.optim.Adam``'s
  single-tensor path (a test checks the two agree). It is deterministic on CPU.
- ``beta1`` and ``beta2`` are two scalar parameters rather than a tuple, so the policy
  factory can validate them like every other parameter.
- ``steps > 1`` runs several forward/backward/update rounds on the same batch (the
  reference code's option); the returned logits are always those of the first forward.
- Layers without an affine (``affine=False``) and BatchNorm1d layers keep the source
  behaviour of the prepared model; the former use batch statistics with no affine.
- ``adapt=False`` predicts with batch statistics and the session's current affine and
  changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from ttaserve.adapters.base import TensorState
from ttaserve.adapters.model import (
    AdaptiveBatchNorm2d,
    ModelError,
    NormHook,
    PreparedModel,
    normalizer,
)
from ttaserve.adapters.registry import bounds, register
from ttaserve.kernels import batch_moments, normalize

ADAM_EPS = 1e-8


@dataclass(frozen=True)
class TentParams:
    lr: float = field(default=1e-3, metadata=bounds(0.0, 10.0))  # Adam learning rate (the paper's CIFAR-scale value)
    beta1: float = field(default=0.9, metadata=bounds(0.0, 1.0))  # Adam first-moment decay
    beta2: float = field(default=0.999, metadata=bounds(0.0, 1.0))  # Adam second-moment decay
    steps: int = field(default=1, metadata=bounds(1, 16))  # gradient steps per batch

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr >= 0.0):
            raise ValueError(f"lr must be finite and >= 0, got {self.lr}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) per sample; stable for large logits."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def affine_layers(model: PreparedModel) -> list[AdaptiveBatchNorm2d]:
    """The BN layers whose gamma and beta tent trains."""
    return [layer for layer in model.bn_layers if layer.weight is not None and layer.bias is not None]


def tent_norm(affine: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> NormHook:
    """Per-layer normalizer: test-batch statistics and the session's affine."""

    def norm(layer: AdaptiveBatchNorm2d, z: torch.Tensor) -> torch.Tensor:
        weight, bias = affine.get(layer.index, (layer.weight, layer.bias))
        if z.numel() > z.shape[1]:
            # Train-mode batch norm without running buffers: biased batch statistics and
            # torch's fused backward; the shared running buffers are never passed in.
            return F.batch_norm(z, None, None, weight, bias, True, 0.0, layer.eps)
        # One value per channel (batch of one 1x1 map): train-mode BN refuses it; the
        # differentiable per-sample path gives the same answer (zero variance).
        mean, var = batch_moments(z)
        return normalize(z, mean[None], var[None], weight, bias, layer.eps)

    return norm


def adam_update(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    step: int, params: TentParams,
) -> None:
    """One in-place Adam step (bias-corrected, no weight decay) on plain tensors."""
    exp_avg.lerp_(grad, 1.0 - params.beta1)
    exp_avg_sq.mul_(params.beta2).addcmul_(grad, grad, value=1.0 - params.beta2)
    bias_correction1 = 1.0 - params.beta1**step
    bias_correction2 = 1.0 - params.beta2**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(ADAM_EPS)
    param.addcdiv_(exp_avg, denom, value=-params.lr / bias_correction1)


@register
class Tent:
    name: ClassVar[str] = "tent"
    description: ClassVar[str] = (
        "test-batch BN statistics; BN affine trained by entropy minimization with Adam "
        "(Wang et al. 2021)"
    )
    Params: ClassVar[type] = TentParams

    def __init__(self, params: TentParams = TentParams()) -> None:
        self.params = params

    def check(self, model: PreparedModel) -> None:
        model.require_batchnorm(self.name)
        if not affine_layers(model):
            raise ModelError("policy 'tent' trains BatchNorm affine parameters; this model has none")

    def init_state(self, model: PreparedModel) -> TensorState:
        state = TensorState()
        for layer in affine_layers(model):
            for part, source in (("weight", layer.weight), ("bias", layer.bias)):
                assert source is not None  # affine_layers keeps only affine layers
                key = f"bn{layer.index}.{part}"
                state[key] = source.detach().clone()
                state[f"{key}.exp_avg"] = torch.zeros_like(source)
                state[f"{key}.exp_avg_sq"] = torch.zeros_like(source)
        state["step"] = torch.zeros((), dtype=torch.int64)
        state["entropy"] = torch.zeros((), dtype=torch.float32)
        return state

    def forward(
        self, model: PreparedModel, x: torch.Tensor, state: TensorState, adapt: bool = True
    ) -> torch.Tensor:
        if not adapt:
            with torch.no_grad():
                return self._logits(model, x, self._affine(model, state, trainable=False))
        first: torch.Tensor | None = None
        for _ in range(self.params.steps):
            logits = self._step(model, x, state)
            first = logits if first is None else first
        assert first is not None
        return first

    def signals(self, state: TensorState) -> dict[str, float]:
        return {"steps": float(state["step"]), "entropy": float(state["entropy"])}

    # -- one round: forward with trainable affine, entropy, Adam -----------------------
    def _step(self, model: PreparedModel, x: torch.Tensor, state: TensorState) -> torch.Tensor:
        affine = self._affine(model, state, trainable=True)
        with torch.enable_grad():
            logits = self._logits(model, x, affine)
            loss = softmax_entropy(logits).mean()
            leaves = [t for pair in affine.values() for t in pair]
            grads = torch.autograd.grad(loss, leaves)
        step = int(state["step"]) + 1
        with torch.no_grad():
            keys = [f"bn{index}.{part}" for index in affine for part in ("weight", "bias")]
            for key, grad in zip(keys, grads, strict=True):
                adam_update(
                    state[key], grad, state[f"{key}.exp_avg"], state[f"{key}.exp_avg_sq"],
                    step, self.params,
                )
            state["step"] = torch.tensor(step, dtype=torch.int64)
            state["entropy"] = loss.detach().to(torch.float32)
        return logits.detach()

    @staticmethod
    def _affine(
        model: PreparedModel, state: TensorState, trainable: bool
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Layer index -> (gamma, beta) for one forward pass. Trainable ones are fresh
        leaves, so gradients reach neither the state tensors nor the shared model."""
        affine = {}
        for layer in affine_layers(model):
            pair = tuple(
                state[f"bn{layer.index}.{part}"].detach().clone().requires_grad_(trainable)
                for part in ("weight", "bias")
            )
            affine[layer.index] = (pair[0], pair[1])
        return affine

    @staticmethod
    def _logits(
        model: PreparedModel, x: torch.Tensor, affine: dict[int, tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        with normalizer(tent_norm(affine)):
            return model(x)
