"""``graded-bn``: batch statistics trusted by depth, batch size and label diversity.

ttaserve's own normalization policy, built for being left on: it keeps most of test-batch
normalization's gain on i.i.d. streams, stays useful on label-correlated streams and at
batch size 1, and stays close to the source model on data that needs no adaptation.
Designed from measurements on the validation split (docs/POLICIES.md "graded-bn" has the
study); it borrows from RoTTA's robust BN (Yuan et al., CVPR 2023: normalize with slowly
moving global statistics instead of the current batch's), from NOTE (Gong et al., NeurIPS
2022: balance what feeds those statistics by predicted label) and from alpha-BN (You et
al. 2021: mix batch and reference statistics).

Each BatchNorm2d layer l normalizes with a mixture of the current batch's moments and a
per-session running estimate (mean and variance per channel, initialized to the source
statistics):

    w_l = B r / (B r + n_l)
    m   = w_l μ_B + (1 − w_l) μ_E
    v   = w_l σ²_B + (1 − w_l) σ²_E + w_l (1 − w_l)(μ_B − μ_E)²     (law of total variance)

* ``n_l`` is how many samples the running estimate is worth at layer l. It grows
  geometrically from ``prior_first`` at the first BatchNorm layer to ``prior_last`` at the
  last (module order). Why: on the demo model, normalizing only the first third of the
  layers with batch statistics keeps ~80 % of TBN's i.i.d. gain, while the deep layers'
  batch statistics are what label-sorted batches corrupt (their moments encode the class).
  Shallow layers follow the batch, deep layers the long-run estimate.
* ``B r`` is the batch's weight: its size B times ``r`` in [0, 1], the label diversity of the
  last ``window`` predictions (effective number of classes exp(H), rescaled so one class
  gives 0 and as many classes as possible gives 1). A session's first batch has no past:
  the source model's predictions of its first 16 samples stand in (one small extra
  forward per session; a confidently recognised one-class batch then gets little weight,
  where assuming diversity cost 1.5 points on label-sorted clean streams). A batch of one label (a camera looking at one
  kind of object) gets little weight however large it is; an i.i.d. batch gets its size.
  At batch size 1 the batch is worth one sample, so instance statistics never dominate.
* After the prediction, the running estimate moves toward the batch's moments by
  ``a = 1 − (1 − momentum)^(B r)``: per sample, so a stream teaches it the same amount
  whatever its batch size, and again weighted by diversity, so a label-sorted stretch
  moves it little. The moments are the ones this forward pass measured, so the estimate
  stays consistent with the normalization of the layers below it (moments recorded under
  a different upstream normalization made a memory-based estimate oscillate).

Properties (tests/adapters/test_graded_bn.py): a fresh session with ``r = 0`` or huge priors
is ``source`` exactly; ``momentum = 0`` leaves the estimate at the source statistics; an
output never depends on later batches; the state round-trips exactly.

Defaults were chosen on the validation split (training images, docs/BENCHMARKS.md): prior
16 → 4096, momentum 0.005 per sample (time constant ~200 samples), window 64 predictions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ttaserve.adapters.base import Normalization, TensorState, run_normalized
from ttaserve.adapters.guard import normalized_entropy
from ttaserve.adapters.model import AdaptiveBatchNorm2d, PreparedModel, aside, observed_moments
from ttaserve.adapters.registry import bounds, register
from ttaserve.kernels.norm import batch_moments, normalize


@dataclass(frozen=True)
class GradedBNParams:
    prior_first: float = field(default=16.0, metadata=bounds(0.0, 1e9))
    prior_last: float = field(default=4096.0, metadata=bounds(0.0, 1e9))
    momentum: float = field(default=0.005, metadata=bounds(0.0, 1.0))
    window: int = field(default=64, metadata=bounds(1, 65536))
    diversity_floor: float = field(default=0.15, metadata=bounds(0.0, 0.99))
    sure_entropy: float = field(default=0.2, metadata=bounds(0.0, 1.0))
    unsure_entropy: float = field(default=0.45, metadata=bounds(0.0, 1.0))
    # A fresh session judges its first batch by the source model's predictions on it (one
    # extra forward per session start) instead of trusting it fully.
    probe_first: bool = True

    def __post_init__(self) -> None:
        if self.prior_first < 0 or self.prior_last < 0:
            raise ValueError("prior_first and prior_last must be >= 0 (samples)")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] (per sample), got {self.momentum}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1 prediction, got {self.window}")
        if not 0.0 <= self.diversity_floor < 1.0:
            raise ValueError(f"diversity_floor must be in [0, 1), got {self.diversity_floor}")
        if not 0.0 <= self.sure_entropy < self.unsure_entropy <= 1.0:
            raise ValueError("need 0 <= sure_entropy < unsure_entropy <= 1 (fractions of ln C), got "
                             f"{self.sure_entropy} and {self.unsure_entropy}")


def layer_priors(params: GradedBNParams, layers: int) -> list[float]:
    """n_l for each BatchNorm layer: geometric from prior_first to prior_last."""
    if layers == 1 or params.prior_first == 0 or params.prior_last == 0:
        return [params.prior_first + (params.prior_last - params.prior_first) * i / max(layers - 1, 1)
                for i in range(layers)]
    ratio = params.prior_last / params.prior_first
    return [params.prior_first * ratio ** (i / (layers - 1)) for i in range(layers)]


@functools.lru_cache(maxsize=64)
def _priors(params: GradedBNParams, layers: int) -> tuple[float, ...]:
    """:func:`layer_priors`, computed once per policy and depth rather than per request."""
    return tuple(layer_priors(params, layers))


def label_diversity(window: torch.Tensor, num_classes: int) -> float:
    """r in [0, 1]: (exp(entropy of the predicted-label histogram) − 1) / (classes possible − 1)
    over the filled part of ``window`` (-1 = empty); 1 while there is nothing to judge."""
    filled = window[window >= 0]
    possible = min(int(filled.numel()), num_classes)
    if possible <= 1:
        return 1.0
    p = torch.bincount(filled, minlength=num_classes).double() / filled.numel()
    p = p[p > 0]
    effective = math.exp(float(-(p * p.log()).sum()))
    return min(1.0, max(0.0, (effective - 1.0) / (possible - 1.0)))


def batch_trust(params: GradedBNParams, state: TensorState, num_classes: int) -> float:
    """r: how much a batch counts, from the recent predictions: their label diversity, or
    their uncertainty when that is higher, above the floor, rescaled to [0, 1]."""
    return trust_of(params, label_diversity(state["window"], num_classes), float(state["entropy"]))


def trust_of(params: GradedBNParams, diversity: float, entropy: float) -> float:
    """r from a label diversity and a mean entropy / ln C (negative: none yet)."""
    unsure = 0.0 if entropy < 0 else (entropy - params.sure_entropy) / (params.unsure_entropy - params.sure_entropy)
    evidence = max(diversity, min(1.0, max(0.0, unsure)))
    return max(0.0, (evidence - params.diversity_floor) / (1.0 - params.diversity_floor))


def probed_trust(params: GradedBNParams, model: PreparedModel, x: torch.Tensor, num_classes: int) -> float:
    """A fresh session's trust in its first batch, from the source model's predictions on
    it: with nothing seen yet, a one-class first batch the model is sure of (a camera
    starting on one kind of object) must not set the statistics, while a batch the shift
    makes the model unsure of still counts."""
    with torch.no_grad(), aside():
        logits = model(x)
    return trust_of(params, label_diversity(logits.argmax(1), num_classes), float(normalized_entropy(logits)))


def mixed(weight: float, mean_a: torch.Tensor, var_a: torch.Tensor, mean_b: torch.Tensor,
          var_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments of the mixture ``weight`` × a + (1 − weight) × b."""
    if weight == 0.0:
        return mean_b, var_b
    # mean_b + w·δ and w·var_a + (1 − w)·var_b + w(1 − w)·δ², in four tensor operations
    # (called twice per layer and request, so at batch size 1 the op count is the cost).
    delta = mean_a - mean_b
    mean = torch.add(mean_b, delta, alpha=weight)
    var = torch.lerp(var_b, var_a, weight).addcmul_(delta, delta, value=weight * (1.0 - weight))
    return mean, var


def push(window: torch.Tensor, seen: int, labels: torch.Tensor) -> torch.Tensor:
    """The ring buffer ``window`` after appending ``labels`` (stream positions kept)."""
    size = window.numel()
    kept = labels[-size:]
    start = seen + labels.numel() - kept.numel()  # stream position of the first kept label
    out = window.clone()
    out[(torch.arange(kept.numel()) + start) % size] = kept
    return out


class GradedNorm:
    """One forward pass of graded-bn: normalizes (it is its own ``hook``), remembers each
    layer's batch moments and commits them to the state afterwards. A value rather than a
    closure, so that a backend running its own graph (ONNX Runtime) can read the mixing
    weights and the running estimate and :meth:`record` the moments its graph computed."""

    def __init__(self, params: GradedBNParams, state: TensorState, priors: Sequence[float],
                 num_classes: int, trust: float) -> None:
        self.params, self.state, self.priors, self.num_classes = params, state, priors, num_classes
        self.trust = trust  # from the predictions before this batch
        self.seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    @property
    def hook(self) -> GradedNorm:
        return self

    def weight(self, layer: AdaptiveBatchNorm2d, batch: int) -> float:
        """w_l: the share of this batch's moments in layer ``layer``'s statistics."""
        samples, prior = batch * self.trust, self.priors[layer.index]
        return samples / (samples + prior) if samples + prior > 0 else 0.0

    def estimate(self, layer: AdaptiveBatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        """The session's running mean and variance of layer ``layer``."""
        return self.state[f"mean.{layer.index}"], self.state[f"var.{layer.index}"]

    def record(self, layer: AdaptiveBatchNorm2d, mean_b: torch.Tensor, var_b: torch.Tensor) -> None:
        """Remember a layer's batch moments for the commit."""
        self.seen.append((layer.index, mean_b, var_b))

    def __call__(self, layer: AdaptiveBatchNorm2d, z: torch.Tensor) -> torch.Tensor:
        mean_b, var_b = observed_moments(z) or batch_moments(z.detach())  # shared with drift signals
        self.record(layer, mean_b, var_b)
        mean, var = mixed(self.weight(layer, z.shape[0]), mean_b, var_b, *self.estimate(layer))
        return normalize(z, mean, var, layer.weight, layer.bias, layer.eps)

    def commit(self, logits: torch.Tensor) -> None:
        state, batch, logits = self.state, logits.shape[0], logits.detach()
        seen = int(state["seen"])
        state["window"] = push(state["window"], seen, logits.argmax(1))
        state["seen"] = torch.tensor(seen + batch, dtype=torch.int64)
        entropy = float(normalized_entropy(logits))
        old, memory = float(state["entropy"]), 1.0 - (1.0 - 1.0 / self.params.window) ** batch
        state["entropy"] = torch.tensor(entropy if old < 0 else old + memory * (entropy - old))
        trust = batch_trust(self.params, state, self.num_classes)
        step = 1.0 - (1.0 - self.params.momentum) ** (batch * trust)
        for index, mean_b, var_b in self.seen:
            mkey, vkey = f"mean.{index}", f"var.{index}"
            state[mkey], state[vkey] = mixed(step, mean_b, var_b, state[mkey], state[vkey])
        state["trust"] = torch.tensor(trust, dtype=torch.float32)


@register
class GradedBN:
    name: ClassVar[str] = "graded-bn"
    description: ClassVar[str] = (
        "batch statistics trusted by layer depth, batch size and label diversity, over a "
        "per-session running estimate; safe on label-sorted streams and at batch size 1"
    )
    Params: ClassVar[type] = GradedBNParams

    def __init__(self, params: GradedBNParams = GradedBNParams()) -> None:
        self.params = params

    def check(self, model: PreparedModel) -> None:
        model.require_batchnorm(self.name)

    def init_state(self, model: PreparedModel) -> TensorState:
        state = TensorState(
            window=torch.full((self.params.window,), -1, dtype=torch.int64),
            seen=torch.zeros((), dtype=torch.int64),
            entropy=torch.tensor(-1.0),  # EMA of the predictions' entropy / ln C; -1: none yet
            trust=torch.ones((), dtype=torch.float32),
        )
        for layer in model.bn_layers:
            state[f"mean.{layer.index}"] = layer.running_mean.detach().clone().float()
            state[f"var.{layer.index}"] = layer.running_var.detach().clone().float()
        return state

    def normalization(self, model: PreparedModel, state: TensorState, x: torch.Tensor) -> Normalization:
        priors = _priors(self.params, len(model.bn_layers))
        classes = max(model.num_classes, 1)
        fresh = self.params.probe_first and int(state["seen"]) == 0
        trust = probed_trust(self.params, model, x, classes) if fresh else batch_trust(self.params, state, classes)
        return GradedNorm(self.params, state, priors, classes, trust)

    def forward(
        self, model: PreparedModel, x: torch.Tensor, state: TensorState, adapt: bool = True
    ) -> torch.Tensor:
        return run_normalized(self.normalization(model, state, x), model, x, adapt)

    def signals(self, state: TensorState) -> dict[str, float]:
        return {"batch_trust": float(state["trust"]), "prediction_entropy": float(state["entropy"])}
