"""Poisoning gate: which batches may update a session's adaptation state.

Test-time adaptation learns from whatever a client sends, so a client can try to drag a
session's state somewhere harmful with batches no camera produces (blank frames, saturated
images, constant fills). Sessions are isolated from each other (a session's data never
reaches another session's state), so what remains to bound is the damage *within* a session.

Mechanism: after a stateful session's forward pass the engine looks at the batch's
statistics at the input of the **first BatchNorm layer** the batch passed through (that
input depends only on the images and the frozen first convolution, not on the policy or
its state, so the same rule holds for every policy) and calls :func:`outlier_reason`:

- ``"constant"``: more than ``max_constant_fraction`` of the images have (almost) no pixel
  variation (per-image standard deviation below ``1e-6``);
- ``"divergence"``: the mean over channels of the symmetric KL divergence between the
  batch's per-channel Gaussian and the layer's source statistics exceeds ``max_divergence``.

A flagged batch is predicted normally (predictions never depend on the update anyway) but
its update is rolled back: the session's state after the batch is bit-identical to the
state before it, the collapse guard does not record it, and the skip is counted
(``Session.skipped[reason]``, ``ttaserve_updates_skipped_total{model,policy,reason}``).

Bound: a flagged batch moves the state by exactly zero. A batch that passes moves it by
one ordinary update of the session's policy (whose step is bounded by the policy's own
parameters: momentum, learning rate, memory size), computed from statistics that are
within ``max_divergence`` of the source statistics at the first layer.

Threshold: the divergence scale depends on the model (how well its BN statistics match
its training data), so :class:`OutlierConfig` leaves the divergence rule off by default
(``max_divergence = inf``; the constant rule is on) and the server sets it
(``--outlier-divergence``, default 15, calibrated on the demo model). Measured on the demo
model, batches of 64 Fashion-MNIST test images, first BN layer: clean 0.004; the worst of
the 15 standard corruptions at severity 5 is contrast with 5.7 (fog 1.5, the rest below
0.5); inverted images 0.94, uniform noise 0.73; all-ones images 22, all-zeros 45, all-0.5
65. 15 sits between the strongest real corruption and the constant fills with a margin of
about 2.6x on the corruption side. For another model, measure its clean and shifted data
the same way (``ttaserve.engine.layer_divergence``) before choosing a value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ttaserve.drift import symmetric_kl

Reason = Literal["constant", "divergence"]
_FLAT_STD = 1e-6


@dataclass(frozen=True)
class OutlierConfig:
    enabled: bool = True  # False: every batch may update its session's state
    max_divergence: float = math.inf  # first-BN-layer symmetric KL (mean over channels)
    max_constant_fraction: float = 0.5  # share of (near-)constant images allowed in a batch

    def __post_init__(self) -> None:
        if self.max_divergence <= 0:
            raise ValueError(f"max_divergence must be > 0, got {self.max_divergence}")
        if not 0.0 <= self.max_constant_fraction <= 1.0:
            raise ValueError(f"max_constant_fraction must be in [0, 1], got {self.max_constant_fraction}")


def outlier_reason(x: torch.Tensor, moments: Sequence[Any], config: OutlierConfig) -> Reason | None:
    """Why the batch ``x`` must not update a session (None: it may).

    ``moments`` are the (layer, mean, var) triples recorded during its forward pass."""
    if not config.enabled:
        return None
    flat = x.detach().flatten(1).float().std(dim=1, correction=0) < _FLAT_STD
    if float(flat.float().mean()) > config.max_constant_fraction:
        return "constant"
    if moments and math.isfinite(config.max_divergence):
        layer, mean, var = moments[0]
        divergence = symmetric_kl(mean, var, layer.running_mean, layer.running_var).mean()
        if not bool(torch.isfinite(divergence)) or float(divergence) > config.max_divergence:
            return "divergence"
    return None
