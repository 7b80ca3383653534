"""``t3`` and ``t3-b``: test-time merging of an expert with its generalist twin.

Implemented from the paper: Imam, Wang, Mahapatra, Yaqub, "T3: Test-Time Model Merging in
VLMs for Zero-Shot Medical Imaging Analysis" (2025). Two models of identical architecture
and label space, the served model (the expert, theta_ft) and its generalist twin theta_pt
(the ``"t3.generalist"`` artifact, a PreparedModel), both predict with their source BN
statistics. Per sample, with JS the Jensen-Shannon divergence (natural log, 0..ln 2)::

    lambda(x) = lambda_min + (lambda_max - lambda_min) * s(x),  s(x) = sigmoid(gamma * JS(p_pt || p_ft))
    theta(x)  = lambda(x) * theta_pt + (1 - lambda(x)) * theta_ft

Agreement keeps the expert, disagreement moves toward the generalist. BN buffers (running
mean/var) are merged like weights; no test-batch statistics are used.

* ``t3`` merges exactly per sample without materializing B weight copies: a conv/linear
  layer is affine in its (weight, bias), so the merged layer's output is the per-sample
  interpolation of the two layers' outputs; BN normalizes sample b with its own merged
  [B, C] statistics and affine. A sample's output does not depend on its batch.
* ``t3-b`` uses one lambda per batch (the mean of the per-sample lambdas), merges every
  parameter and buffer once and runs a single merged forward.

Choices (the paper's code was not available here; its README gives the formula and
gamma = 0.5 but no lambda bounds, and no rescaling of JS could be verified):

* Taken literally, s(x) only spans [0.5, sigmoid(0.5 ln 2)] = [0.5, 0.5866], so lambda stays
  in the narrow band [lambda_min + 0.5 D, lambda_min + 0.587 D] (D = lambda_max - lambda_min):
  a near-static merge. ``rescale=True`` maps s linearly onto [0, 1] so lambda spans the
  whole [lambda_min, lambda_max] (JS = 0 -> lambda_min, JS = ln 2 -> lambda_max); it is
  our addition and off by default, so the default is the formula as published.
* Defaults lambda_min = 0.75, lambda_max = 1, chosen on the accuracy benchmark's validation
  split (training images, severity 4, mixed stream, batch 64; docs/BENCHMARKS.md "Accuracy"): error
  18.1 / 15.6 / 14.1 / 13.7 % for lambda_min = 0 / 0.25 / 0.5 / 0.75 (expert 38.6 %,
  generalist 14.0 %); with the literal sigmoid band, 0.75 keeps lambda in 0.875-0.897.
  Merging only helps twins that are linearly mode-connected (an expert fine-tuned from its
  generalist, as in the paper); the demo twins are (static merges at any lambda stay within
  the two models' clean errors), an unrelated pair is not.
* JS is clamped to [0, ln 2] to absorb rounding; probabilities that underflow to 0
  contribute 0 (x log x -> 0).
* Supported layers: Conv1d/2d/3d, Linear and BatchNorm (with running statistics); a model
  with any other layer that owns parameters is rejected (ModelError). Integer buffers
  (num_batches_tracked) are the expert's.
* The only state is an optional EMA of the batch-mean lambda (``ema_momentum`` > 0), for
  metrics; it never affects predictions.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ttaserve.adapters.base import TensorState
from ttaserve.adapters.model import AdaptiveBatchNorm2d, ModelError, PreparedModel, normalizer
from ttaserve.adapters.registry import bounds, register
from ttaserve.kernels import normalize

GENERALIST = "t3.generalist"
LN2 = math.log(2.0)
_AFFINE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORM = (AdaptiveBatchNorm2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_BN_TENSORS = ("running_mean", "running_var", "weight", "bias")


@dataclass(frozen=True)
class T3Params:
    lambda_min: float = field(default=0.75, metadata=bounds(0.0, 1.0))  # merge weight of the generalist when the models agree (docs/BENCHMARKS.md "Accuracy")
    lambda_max: float = field(default=1.0, metadata=bounds(0.0, 1.0))  # ... when they disagree completely (before the sigmoid band)
    gamma: float = field(default=0.5, metadata=bounds(0.0, 1e3))  # sigmoid slope on JS
    rescale: bool = False  # map sigmoid(gamma*JS) from [0.5, sigmoid(gamma ln 2)] onto [0, 1]
    ema_momentum: float = field(default=0.1, metadata=bounds(0.0, 1.0))  # EMA of the batch-mean lambda for metrics; 0 keeps no state

    def __post_init__(self) -> None:
        if not 0.0 <= self.lambda_min <= self.lambda_max <= 1.0:
            raise ValueError(
                f"need 0 <= lambda_min <= lambda_max <= 1, got {self.lambda_min}, {self.lambda_max}"
            )
        if not self.gamma > 0.0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if not 0.0 <= self.ema_momentum <= 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1], got {self.ema_momentum}")


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Per-row Jensen-Shannon divergence (natural log) of softmax(logits_a), softmax(logits_b)."""
    log_a, log_b = F.log_softmax(logits_a.float(), 1), F.log_softmax(logits_b.float(), 1)
    log_m = torch.logaddexp(log_a, log_b) - LN2

    def kl_to_m(log_p: torch.Tensor) -> torch.Tensor:
        p = log_p.exp()
        return torch.where(p > 0, p * (log_p - log_m), torch.zeros_like(p)).sum(1)

    return (0.5 * (kl_to_m(log_a) + kl_to_m(log_b))).clamp(0.0, LN2)


def merging_coefficient(js: torch.Tensor, params: T3Params) -> torch.Tensor:
    """lambda per sample: the generalist's weight in the merge."""
    s = torch.sigmoid(params.gamma * js)
    if params.rescale:
        top = torch.sigmoid(torch.tensor(params.gamma * LN2, dtype=s.dtype))
        s = ((s - 0.5) / (top - 0.5)).clamp(0.0, 1.0)
    return params.lambda_min + (params.lambda_max - params.lambda_min) * s


def merge_state(expert: nn.Module, generalist: nn.Module, lam: float) -> dict[str, torch.Tensor]:
    """lam * theta_pt + (1 - lam) * theta_ft for every floating parameter and buffer."""
    pt = generalist.state_dict()
    return {
        name: torch.lerp(ft, pt[name], lam) if ft.is_floating_point() else ft
        for name, ft in expert.state_dict().items()
    }


# -- the merged executor ----------------------------------------------------------------
# A structural copy of the expert that shares its tensors; its parameterized layers read
# the merge of the current forward pass from this context variable (so concurrent forward
# passes with different lambdas never see each other's).
@dataclass(frozen=True)
class _Merge:
    lam: torch.Tensor | None = None  # [B] per-sample lambda (t3)
    state: dict[str, torch.Tensor] | None = None  # merged state dict (t3-b)


_ACTIVE: contextvars.ContextVar[_Merge] = contextvars.ContextVar("ttaserve_t3_merge")


@contextlib.contextmanager
def _merging(merge: _Merge) -> Iterator[None]:
    token = _ACTIVE.set(merge)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _per_sample(lam: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return lam.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


class _MergedAffine(nn.Module):
    """Conv/linear layer whose weights are the active merge of the two twins' layers."""

    def __init__(self, name: str, ft: nn.Module, pt: nn.Module) -> None:
        super().__init__()
        self.name, self.pair = name, (ft, pt)  # a tuple: not registered as submodules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        merge, (ft, pt) = _ACTIVE.get(), self.pair
        if merge.state is not None:
            weight, bias = merge.state[f"{self.name}.weight"], merge.state.get(f"{self.name}.bias")
            if isinstance(ft, nn.Linear):
                return F.linear(x, weight, bias)
            return ft._conv_forward(x, weight, bias)  # type: ignore[operator]
        # (l W_pt + (1 - l) W_ft) x + (l b_pt + (1 - l) b_ft) == l pt(x) + (1 - l) ft(x)
        out_ft = ft(x)
        return torch.lerp(out_ft, pt(x), _per_sample(merge.lam, out_ft))  # type: ignore[arg-type]


class _MergedNorm(nn.Module):
    """BatchNorm with merged running statistics and affine (per sample for t3)."""

    def __init__(self, name: str, ft: nn.Module, pt: nn.Module) -> None:
        super().__init__()
        self.name, self.pair, self.eps = name, (ft, pt), float(ft.eps)  # type: ignore[arg-type]

    def _tensor(self, merge: _Merge, key: str) -> torch.Tensor | None:
        ft, pt = (getattr(m, key) for m in self.pair)
        if ft is None:
            return None
        if merge.state is not None:
            return merge.state[f"{self.name}.{key}"]
        return torch.lerp(ft, pt, merge.lam[:, None].to(ft.dtype))  # type: ignore[index]  # [B, C]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        merge = _ACTIVE.get()
        mean, var, weight, bias = (self._tensor(merge, key) for key in _BN_TENSORS)
        return normalize(z, mean, var, weight, bias, self.eps)  # type: ignore[arg-type]


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def build_executor(expert: nn.Module, generalist: nn.Module) -> nn.Module:
    """The expert's structure with every parameterized layer merging the two twins."""
    shared = {id(t): t for t in (*expert.parameters(), *expert.buffers())}
    executor = copy.deepcopy(expert, memo=shared)
    pt_modules = dict(generalist.named_modules())
    for name, ft in list(expert.named_modules()):
        if isinstance(ft, _NORM):
            _set_submodule(executor, name, _MergedNorm(name, ft, pt_modules[name]))
        elif isinstance(ft, _AFFINE):
            _set_submodule(executor, name, _MergedAffine(name, ft, pt_modules[name]))
    return executor.eval()


def check_twins(expert: nn.Module, generalist: nn.Module) -> None:
    """Raise ModelError unless the two models can be merged layer by layer."""
    ft_state, pt_state = expert.state_dict(), generalist.state_dict()
    shapes = {k: tuple(v.shape) for k, v in ft_state.items()}
    if shapes != {k: tuple(v.shape) for k, v in pt_state.items()}:
        diff = sorted(set(shapes.items()) ^ {(k, tuple(v.shape)) for k, v in pt_state.items()})
        raise ModelError(f"t3: expert and generalist differ in parameter names/shapes: {diff[:6]}")
    pt_modules = dict(generalist.named_modules())
    for name, ft in expert.named_modules():
        pt = pt_modules.get(name)
        if pt is None or type(pt) is not type(ft):
            raise ModelError(
                f"t3: layer {name!r} is {type(ft).__name__} in the expert, "
                f"{type(pt).__name__} in the generalist"
            )
        _check_layer(name, ft, pt)


def _check_layer(name: str, ft: nn.Module, pt: nn.Module) -> None:
    owned = [*ft.named_parameters(recurse=False), *ft.named_buffers(recurse=False)]
    if isinstance(ft, _NORM):
        if ft.running_mean is None or ft.running_var is None:
            raise ModelError(f"t3: BatchNorm {name!r} has no running statistics to merge")
        if float(ft.eps) != float(pt.eps):  # type: ignore[arg-type]
            raise ModelError(f"t3: BatchNorm {name!r} has different eps in the two models")
    elif owned and not isinstance(ft, _AFFINE):
        raise ModelError(
            f"t3: cannot merge layer {name!r} ({type(ft).__name__}) per sample; supported "
            "layers with parameters are Conv1d/2d/3d, Linear and BatchNorm"
        )


@register
class T3:
    name: ClassVar[str] = "t3"
    description: ClassVar[str] = (
        "merge expert and generalist weights per sample by their prediction JS divergence (Imam et al. 2025)"
    )
    Params: ClassVar[type] = T3Params
    per_sample: ClassVar[bool] = True

    def __init__(self, params: T3Params = T3Params()) -> None:
        self.params = params
        self._executors: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def check(self, model: PreparedModel) -> None:
        generalist = self._generalist(model)
        check_twins(model.module, generalist.module)
        if generalist.num_classes != model.num_classes:
            raise ModelError("t3: expert and generalist have different numbers of classes")

    def init_state(self, model: PreparedModel) -> TensorState:
        if self.params.ema_momentum == 0.0:
            return TensorState()
        zero = torch.zeros((), dtype=torch.float32)
        return TensorState(
            lambda_ema=zero.clone(), lambda_last=zero.clone(), js_last=zero.clone(),
            batches=torch.zeros((), dtype=torch.int64),
        )

    def forward(
        self, model: PreparedModel, x: torch.Tensor, state: TensorState, adapt: bool = True
    ) -> torch.Tensor:
        generalist = self._generalist(model)
        with torch.no_grad(), normalizer(None):
            js = js_divergence(generalist(x), model(x))
            lam = merging_coefficient(js, self.params)
            if self.per_sample:
                merge = _Merge(lam=lam)
            else:
                merge = _Merge(state=merge_state(model.module, generalist.module, float(lam.mean())))
            with _merging(merge):
                logits = self._executor(model, generalist)(x)
        if adapt and state:
            self._track(state, lam, js)
        return logits

    def signals(self, state: TensorState) -> dict[str, float]:
        if not state or int(state["batches"]) == 0:
            return {}
        return {k: float(state[k]) for k in ("lambda_ema", "lambda_last", "js_last")}

    def _track(self, state: TensorState, lam: torch.Tensor, js: torch.Tensor) -> None:
        mean = lam.mean().float()
        first = int(state["batches"]) == 0
        m = 1.0 if first else self.params.ema_momentum
        state["lambda_ema"] = (1.0 - m) * state["lambda_ema"] + m * mean
        state["lambda_last"] = mean.clone()
        state["js_last"] = js.mean().float()
        state["batches"] = state["batches"] + 1

    def _generalist(self, model: PreparedModel) -> PreparedModel:
        generalist = model.artifact(GENERALIST)
        if not isinstance(generalist, PreparedModel):
            raise ModelError(f"t3: artifact {GENERALIST!r} must be a PreparedModel (use prepare(module))")
        return generalist

    def _executor(self, model: PreparedModel, generalist: PreparedModel) -> nn.Module:
        # Built once per served model; it shares the twins' tensors and holds no state.
        with self._lock:
            executor = self._executors.get(model.module)
            if executor is None:
                check_twins(model.module, generalist.module)
                executor = self._executors[model.module] = build_executor(model.module, generalist.module)
        return executor


@register
class T3Batch(T3):
    name: ClassVar[str] = "t3-b"
    description: ClassVar[str] = (
        "t3 with one merging coefficient per batch (mean lambda), one merged forward (Imam et al. 2025)"
    )
    per_sample: ClassVar[bool] = False
