"""``ecotta``: continual test-time adaptation of small meta networks around a frozen model.

Implemented from the paper: Song, Lee, Kweon, Choi, "EcoTTA: Memory-Efficient Continual
Test-time Adaptation via Self-distilled Regularization" (CVPR 2023). There is no official
code; community re-implementations were only read to check behaviour.

Architecture. The model's ``stages`` are cut into P partitions f_1..f_P; ``stem``, ``pool``
and ``head`` stay frozen and unchanged. Partition k gets a meta network: a BatchNorm on its
output (meta-BN) and a conv block (3x3 conv -> BN -> ReLU, stride = the partition's
downsampling, channels = its output channels) on its input:

    x~_k = metaBN_k(f_k(x~_{k-1})) + conv_k(x~_{k-1}),    x_k = f_k(x~_{k-1}) (detached)

Partitioning. The units are the residual blocks: a stage that is an ``nn.Sequential`` of
composite modules contributes each child, any other stage is one unit. n units are cut into
P contiguous groups of floor(n/P) or ceil(n/P) units, the smaller groups first, so the
partitions are denser in shallow layers (the paper's ResNet-50 split is [3, 3, 5, 5]). The
demo model has 4 blocks (16->16, 16->32 /2, 32->32, 32->64 /2); the default P = 4 gives
each its own meta network. The stride of a conv block is read from the spatial sizes at
run time (ceil(H_in / H_out)), so the meta tensors alone describe the meta networks.

Statistics (chosen; the paper adapts the meta networks in train mode, as TENT does).
The original network's BatchNorm keeps its source statistics: it is frozen, and zero
conv blocks with identity meta-BNs reproduce it exactly. The meta-BNs (partition BN and
conv-block BN) normalize with the current test batch's statistics by default
(``meta_bn_stats="batch"``); their running buffers, estimated during warm-up, are neither
used nor updated then. ``"running"`` normalizes with those buffers instead (fixed at test
time), which makes a sample's output independent of its batch.

Per batch: loss = mean entropy over samples with H < entropy_margin * ln C (EATA's filter;
zero, with zero gradient, when none pass) + lam * sum_k mean|x~_k - x_k|, then one SGD step
(momentum, no dampening, no weight decay) on the meta networks only. The returned logits
are those of that same forward pass, computed before the step. Continual: no reset.

Memory. Gradients reach shallow meta networks through the frozen partitions, which then
keep only what input gradients need (:mod:`ttaserve.kernels.frozen`: conv weights, BN
scales, ReLU masks); the loss terms keep no extra activation. On the demo model at batch 64
a step keeps 29 MB for backward, a plain TENT step 38 MB (tests/adapters/test_ecotta.py).

Warm-up (:func:`warm_up`, before serving): meta-BN starts as gamma = source std, beta =
source mean of the partition output and the conv block's BN gamma as 0, so training starts
from (almost) the original network; then cross-entropy on source data, original frozen.

Defaults lr = 5e-3 and lam = 0.5 were picked on held-out data (test images 2048-4095,
gaussian blur sigma 1.5, contrast 0.2 and gaussian noise std 0.3; the headline is noise
std 0.5 on images 0-2047), grid lr {1e-3, 5e-3, 2e-2} x lam {0, 0.5, 2}, batch 64. Stream
error in %, lam = 0 / 0.5 / 2 at lr 5e-3: blur 22.7 / 22.9 / 24.4 (source 40.9), contrast
46.6 / 46.1 / 46.7 (85.3), noise 47.6 / 47.6 / 48.5 (83.8). lr 2e-2 wins on blur and noise
at lam 0 but is the worst everywhere at lam 2; lr 5e-3 is never far from the best, and
lam = 0.5 keeps the self-distillation that guards long continual streams at no cost here.
``meta_bn_stats="running"`` was worse than source on all three (42-90 %).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ttaserve.adapters.base import TensorState
from ttaserve.adapters.model import ModelError, PreparedModel, normalizer, prepare
from ttaserve.adapters.registry import bounds, register
from ttaserve.kernels import batch_moments
from ttaserve.kernels.frozen import FrozenLayers, masked_relu, mean_abs_diff

ARTIFACT = "ecotta.meta"
EPS = 1e-5
TRAINABLE = ("bn.weight", "bn.bias", "conv.weight", "conv_bn.weight", "conv_bn.bias")
STATS = ("stats.loss", "stats.kept", "stats.steps")


@dataclass(frozen=True)
class EcoTTAParams:
    lr: float = field(default=5e-3, metadata=bounds(0.0, 10.0))
    lam: float = field(default=0.5, metadata=bounds(0.0, 100.0))  # weight of the self-distilled regularization
    momentum: float = field(default=0.9, metadata=bounds(0.0, 1.0))
    entropy_margin: float = field(default=0.4, metadata=bounds(0.0, 10.0))  # samples with H < entropy_margin * ln C drive the entropy loss
    partitions: int = field(default=0, metadata=bounds(0, 64))  # 0: as many as the meta-network artifact was built with
    meta_bn_stats: str = "batch"  # "batch" (test-batch statistics) or "running" (warm-up's)

    def __post_init__(self) -> None:
        if self.lr < 0 or self.lam < 0 or not 0 <= self.momentum < 1:
            raise ValueError("need lr >= 0, lam >= 0 and 0 <= momentum < 1")
        if self.entropy_margin <= 0 or self.partitions < 0:
            raise ValueError("need entropy_margin > 0 and partitions >= 0")
        if self.meta_bn_stats not in ("batch", "running"):
            raise ValueError(f"meta_bn_stats must be 'batch' or 'running', not {self.meta_bn_stats!r}")


def encoder_blocks(module: nn.Module) -> list[nn.Module]:
    """The units partitions are made of; the model must expose stem, stages, pool, head."""
    missing = [a for a in ("stem", "stages", "pool", "head") if not hasattr(module, a)]
    stages = getattr(module, "stages", None)
    if missing or not isinstance(stages, (nn.ModuleList, nn.Sequential)):
        raise ModelError(
            "ecotta needs a model with attributes stem, stages (an nn.ModuleList/Sequential of "
            f"stages), pool and head, called in that order; missing or wrong: {missing or ['stages']}"
        )
    blocks: list[nn.Module] = []
    for stage in stages:
        children = list(stage.children())
        composite = isinstance(stage, nn.Sequential) and all(list(c.children()) for c in children)
        blocks.extend(children if composite and children else [stage])
    return blocks


def partition_modules(module: nn.Module, partitions: int) -> list[list[nn.Module]]:
    """Contiguous groups of blocks, the smaller (shallower) groups first."""
    blocks = encoder_blocks(module)
    if not 1 <= partitions <= len(blocks):
        raise ModelError(f"ecotta: {partitions} partitions requested, the model has {len(blocks)} blocks")
    small, extra = divmod(len(blocks), partitions)
    sizes = [small] * (partitions - extra) + [small + 1] * extra
    starts = [sum(sizes[:k]) for k in range(partitions)]
    return [blocks[s : s + n] for s, n in zip(starts, sizes)]


def run_blocks(blocks: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x


def count_partitions(tensors: dict[str, torch.Tensor]) -> int:
    return sum(1 for name in tensors if name.startswith("meta.") and name.endswith(".conv.weight"))


def _bn(z: torch.Tensor, t: dict[str, torch.Tensor], prefix: str, batch: bool, track: bool) -> torch.Tensor:
    w, b = t[f"{prefix}.weight"], t[f"{prefix}.bias"]
    mean, var = t[f"{prefix}.running_mean"], t[f"{prefix}.running_var"]
    if batch:  # train-mode BN; buffers only move during warm-up
        return F.batch_norm(z, mean if track else None, var if track else None, w, b, True, 0.1, EPS)
    return F.batch_norm(z, mean, var, w, b, False, 0.0, EPS)


def meta_forward(
    model: PreparedModel, t: dict[str, torch.Tensor], x: torch.Tensor, batch: bool = True, track: bool = False
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Logits of the model with meta networks, and (x~_k, x_k) per partition."""
    module = model.module
    pairs = []
    # The original network's BatchNorm layers use the active normalizer: none (source
    # statistics) when ecotta runs alone, the normalization part in a composition.
    h = module.get_submodule("stem")(x)
    for k, group in enumerate(partition_modules(module, count_partitions(t))):
        with FrozenLayers() if torch.is_grad_enabled() else contextlib.nullcontext():
            f = run_blocks(group, h)
        stride = -(-h.shape[-1] // f.shape[-1])
        side = F.conv2d(h, t[f"meta.{k}.conv.weight"], stride=stride, padding=1)
        side = masked_relu(_bn(side, t, f"meta.{k}.conv_bn", batch, track))
        h = _bn(f, t, f"meta.{k}.bn", batch, track) + side
        pairs.append((h, f.detach()))
    logits = module.get_submodule("head")(module.get_submodule("pool")(h))
    return logits, pairs


def ecotta_loss(
    logits: torch.Tensor, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], margin: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, number of samples kept by the entropy filter)."""
    log_p = logits.log_softmax(1)
    entropy = -(log_p.exp() * log_p).sum(1)
    keep = entropy < margin * math.log(logits.shape[1])
    # where() gives filtered samples an exact zero gradient; the floor of 1 makes "none
    # kept" a zero loss instead of 0/0.
    kept = keep.sum()
    entropy_loss = torch.where(keep, entropy, 0.0).sum() / kept.clamp_min(1)
    regularization = sum(mean_abs_diff(xt, xo) for xt, xo in pairs)
    return entropy_loss + lam * regularization, kept


def init_meta(
    model: PreparedModel, x_source: torch.Tensor, partitions: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Meta networks before warm-up: meta-BN reproduces the source moments of each partition
    output and the conv blocks start at zero, so the whole starts close to the original."""
    generator = torch.Generator().manual_seed(seed)
    module, tensors = model.module, {}
    with torch.no_grad(), normalizer(None):
        h = module.get_submodule("stem")(x_source)
        for k, group in enumerate(partition_modules(module, partitions)):
            f = run_blocks(group, h)
            c_out, c_in = f.shape[1], h.shape[1]
            conv = torch.randn(c_out, c_in, 3, 3, generator=generator) * math.sqrt(2.0 / (9 * c_in))
            mean, var = batch_moments(f)
            tensors.update({
                f"meta.{k}.bn.weight": (var + EPS).sqrt(), f"meta.{k}.bn.bias": mean.clone(),
                f"meta.{k}.bn.running_mean": mean.clone(), f"meta.{k}.bn.running_var": var.clone(),
                f"meta.{k}.conv.weight": conv,
                f"meta.{k}.conv_bn.weight": torch.zeros(c_out), f"meta.{k}.conv_bn.bias": torch.zeros(c_out),
                f"meta.{k}.conv_bn.running_mean": torch.zeros(c_out),
                f"meta.{k}.conv_bn.running_var": torch.ones(c_out),
            })
            h = f
    return tensors


def trainable_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [f"meta.{k}.{n}" for k in range(count_partitions(tensors)) for n in TRAINABLE]


def sgd_step(
    tensors: dict[str, torch.Tensor],
    velocity: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    lr: float,
    momentum: float,
) -> None:
    """In place: v = momentum * v + g, p -= lr * v (torch.optim.SGD, no dampening)."""
    with torch.no_grad():
        for name, grad in grads.items():
            tensors[name].sub_(velocity[name].mul_(momentum).add_(grad), alpha=lr)


def warm_up(
    model: PreparedModel,
    x_source: torch.Tensor,
    y_source: torch.Tensor,
    steps: int = 600,
    batch_size: int = 128,
    lr: float = 0.05,
    partitions: int = 4,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Train the meta networks with cross-entropy on source data, the original frozen
    (SGD momentum 0.9, cosine learning-rate schedule). Returns the meta tensors (the artifact)."""
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randperm(len(x_source), generator=generator)[:512]
    tensors = init_meta(model, x_source[probe], partitions, seed)
    names = trainable_names(tensors)
    velocity = {name: torch.zeros_like(tensors[name]) for name in names}
    params = [tensors[name].requires_grad_(True) for name in names]
    with torch.enable_grad():
        for step in range(steps):
            idx = torch.randint(len(x_source), (batch_size,), generator=generator)
            logits, _ = meta_forward(model, tensors, x_source[idx], batch=True, track=True)
            grads = torch.autograd.grad(F.cross_entropy(logits, y_source[idx]), params)
            step_lr = 0.5 * lr * (1.0 + math.cos(math.pi * step / steps))
            sgd_step(tensors, velocity, dict(zip(names, grads)), step_lr, 0.9)
    return {name: t.detach().clone().contiguous() for name, t in tensors.items()}


def build_meta_artifact(
    module: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    out_path: str,
    partitions: int = 4,
    steps: int = 600,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Warm up meta networks for a user's model on its source data ``(x, y)`` and save them
    as a safetensors file (the model's ``ecotta.meta`` artifact)."""
    from safetensors.torch import save_file

    prepared = prepare(module)
    partitions = min(partitions, len(encoder_blocks(prepared.module)))
    tensors = warm_up(prepared, data[0], data[1], steps=steps, partitions=partitions, seed=seed)
    save_file(tensors, out_path)
    return tensors


@register
class EcoTTA:
    name: ClassVar[str] = "ecotta"
    description: ClassVar[str] = (
        "adapt small meta networks around the frozen model, entropy + self-distillation (Song et al. 2023)"
    )
    Params: ClassVar[type] = EcoTTAParams
    over_normalization: ClassVar[bool] = True  # composes as NORM+ecotta (ttaserve/adapters/compose.py)

    def __init__(self, params: EcoTTAParams = EcoTTAParams()) -> None:
        self.params = params

    def check(self, model: PreparedModel) -> None:
        blocks = encoder_blocks(model.module)
        if self.params.partitions > len(blocks):
            raise ModelError(f"ecotta: {self.params.partitions} partitions, the model has {len(blocks)} blocks")

    def init_state(self, model: PreparedModel) -> TensorState:
        meta = model.artifact(ARTIFACT)
        found = count_partitions(meta)
        if found == 0 or self.params.partitions not in (0, found):
            raise ModelError(
                f"the ecotta.meta artifact holds {found} meta networks, the policy asks for "
                f"{self.params.partitions}; rebuild it with 'ttaserve prepare ecotta'"
            )
        partition_modules(model.module, found)  # the model must have enough blocks
        state = TensorState({name: t.detach().clone() for name, t in meta.items()})
        for name in trainable_names(state):
            state[f"momentum.{name}"] = torch.zeros_like(state[name])
        state.update({name: torch.zeros(()) for name in STATS})
        return state

    def forward(
        self, model: PreparedModel, x: torch.Tensor, state: TensorState, adapt: bool = True
    ) -> torch.Tensor:
        batch = self.params.meta_bn_stats == "batch"
        if not adapt:
            with torch.no_grad():
                return meta_forward(model, state, x, batch)[0]
        names = trainable_names(state)
        leaves = {n: state[n].detach().requires_grad_(True) for n in names}
        with torch.enable_grad():
            logits, pairs = meta_forward(model, {**state, **leaves}, x, batch)
            loss, kept = ecotta_loss(logits, pairs, self.params.entropy_margin, self.params.lam)
            grads = torch.autograd.grad(loss, list(leaves.values()))
        velocity = {name: state[f"momentum.{name}"] for name in names}
        sgd_step(state, velocity, dict(zip(names, grads)), self.params.lr, self.params.momentum)
        with torch.no_grad():
            state["stats.loss"].fill_(loss.detach())
            state["stats.kept"].fill_(kept.float() / x.shape[0])
            state["stats.steps"].add_(1.0)
        return logits.detach()

    def signals(self, state: TensorState) -> dict[str, float]:
        return {
            "loss": float(state["stats.loss"]),
            "kept_fraction": float(state["stats.kept"]),
            "steps": float(state["stats.steps"]),
        }
