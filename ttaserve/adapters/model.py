"""The model as policies see it: a frozen copy whose BatchNorm2d layers ask the running
policy for their statistics, and whose classifier head reports its input (the features).

A policy installs a *normalizer* for the duration of one forward pass with
:func:`normalizer`; the hook lives in a context variable, so forward passes running in
different threads never see each other's hook. Without a normalizer the layers behave
exactly like the original BatchNorm in eval mode.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ttaserve.kernels.norm import batch_moments, pooled_moments

NormHook = Callable[["AdaptiveBatchNorm2d", torch.Tensor], torch.Tensor]

_NORM_HOOK: contextvars.ContextVar[NormHook | None] = contextvars.ContextVar(
    "ttaserve_norm_hook", default=None
)
_MOMENTS: contextvars.ContextVar[list[tuple[AdaptiveBatchNorm2d, torch.Tensor, torch.Tensor]] | None] = (
    contextvars.ContextVar("ttaserve_moments", default=None)
)
_SEGMENTS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "ttaserve_segments", default=None
)
# The layer input being normalized now and the moments the drift observer just computed
# for it, so that a normalizer needing the same batch moments does not compute them twice.
_OBSERVED: contextvars.ContextVar[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = (
    contextvars.ContextVar("ttaserve_observed", default=None)
)
# Set while a normalizer that reports its own per-sample moments runs for the observer.
_REPORTING: contextvars.ContextVar[bool] = contextvars.ContextVar("ttaserve_reporting", default=False)
_FEATURES: contextvars.ContextVar[list[torch.Tensor] | None] = contextvars.ContextVar(
    "ttaserve_features", default=None
)


class ModelError(ValueError):
    """A model cannot be used the way it was asked to be (e.g. no BatchNorm for a BN policy)."""


class Unsupported(ModelError):
    """The policy exists, but not for this kind of model (e.g. a gradient policy on an ONNX
    Runtime model); the message names what does support it."""


class AdaptiveBatchNorm2d(nn.Module):
    """Drop-in for an eval-mode ``nn.BatchNorm2d`` that defers to the active normalizer.

    It shares (does not copy) the source layer's parameters and buffers; they are frozen.
    """

    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, bn: nn.BatchNorm2d, index: int, name: str) -> None:
        super().__init__()
        self.index = index
        self.layer_name = name
        self.num_features = bn.num_features
        self.eps = bn.eps
        self.momentum = bn.momentum
        self.weight = bn.weight
        self.bias = bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        sink = _MOMENTS.get()
        hook = _NORM_HOOK.get()
        if sink is not None:  # drift monitoring: what the data looks like at this layer
            segments = _SEGMENTS.get()
            if hook is not None and segments is None and getattr(hook, "reports_moments", False):
                # The normalizer computes per-sample moments anyway and reports them
                # (report_instance_moments): pooling them is far cheaper than two more
                # passes over the activation.
                reporting = _REPORTING.set(True)
                try:
                    return hook(self, z)
                finally:
                    _REPORTING.reset(reporting)
            mean, var = _moments(z.detach(), segments)
            sink.append((self, mean, var))
            if hook is not None:
                token = _OBSERVED.set((z, mean, var))
                try:
                    return hook(self, z)
                finally:
                    _OBSERVED.reset(token)
        if hook is None:
            return self.source(z)
        return hook(self, z)

    def source(self, z: torch.Tensor) -> torch.Tensor:
        """The original layer's eval-mode output (source statistics)."""
        return F.batch_norm(
            z, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class FeatureTap(nn.Module):
    """Wraps the classifier head and records its input when a capture is active."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sink = _FEATURES.get()
        if sink is not None:
            sink.append(x)
        return self.head(x)


@contextlib.contextmanager
def normalizer(hook: NormHook | None) -> Iterator[None]:
    """Route every AdaptiveBatchNorm2d of forward passes in this context through ``hook``."""
    token = _NORM_HOOK.set(hook)
    try:
        yield
    finally:
        _NORM_HOOK.reset(token)


def active_normalizer() -> NormHook | None:
    """The normalizer of the forward pass running in this context (None: source). Backends
    that do not run the torch layers (ONNX Runtime) read it to pick their graph."""
    return _NORM_HOOK.get()


@contextlib.contextmanager
def aside() -> Iterator[None]:
    """A forward pass outside the current one: source statistics, nothing observed or
    captured (a policy's look at a batch before its real pass)."""
    tokens = (_NORM_HOOK.set(None), _MOMENTS.set(None), _SEGMENTS.set(None), _FEATURES.set(None),
              _OBSERVED.set(None))
    try:
        yield
    finally:
        for var, token in zip((_NORM_HOOK, _MOMENTS, _SEGMENTS, _FEATURES, _OBSERVED), tokens):
            var.reset(token)  # type: ignore[attr-defined]


def observed_moments(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The batch moments (:func:`ttaserve.kernels.norm.batch_moments`) of exactly this layer
    input if the drift observer already computed them in this pass, else None: [C], or in
    a shared pass, where only a normalizer handed the whole batch can match, per request
    segment [S, C]."""
    seen = _OBSERVED.get()
    return (seen[1], seen[2]) if seen is not None and seen[0] is z else None


def observing() -> bool:
    """Whether this forward pass is asked for its BatchNorm-input moments."""
    return _MOMENTS.get() is not None


def report_instance_moments(layer: AdaptiveBatchNorm2d, inst_mean: torch.Tensor, inst_var: torch.Tensor) -> None:
    """A normalizer declaring ``reports_moments = True`` hands the drift observer the
    per-sample moments [B, C] it computed for the layer input it was given, when the
    observer asked it to (a lone batch); otherwise this does nothing."""
    if _REPORTING.get():
        record_instance_moments(layer, inst_mean.detach(), inst_var.detach())


def record_instance_moments(layer: AdaptiveBatchNorm2d, inst_mean: torch.Tensor, inst_var: torch.Tensor) -> None:
    """Report a layer's input moments computed elsewhere (per sample, [B, C]) to the active
    observer, as batch moments over the whole batch or per segment, like the torch layers do.
    Batch variance = mean of the instance variances + variance of the instance means."""
    sink = _MOMENTS.get()
    if sink is None:
        return
    offsets = _SEGMENTS.get() or [0, inst_mean.shape[0]]
    means, variances = zip(*(pooled_moments(inst_mean[a:b], inst_var[a:b]) for a, b in zip(offsets[:-1], offsets[1:])))
    if _SEGMENTS.get() is None:
        sink.append((layer, means[0], variances[0]))
    else:
        sink.append((layer, torch.stack(means), torch.stack(variances)))


def _moments(z: torch.Tensor, offsets: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    # kernels.norm.batch_moments (two passes) rather than torch.var_mean, which on CPU was
    # the largest cost of drift observation (kernels/norm.py says why).
    if offsets is None:
        return batch_moments(z)
    pairs = [batch_moments(z[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    return torch.stack([m for m, _ in pairs]), torch.stack([v for _, v in pairs])


class MomentLog(list[tuple[AdaptiveBatchNorm2d, torch.Tensor, torch.Tensor]]):
    """The (layer, mean, var) triples of one forward pass, in call order, and the drift
    divergences computed from them once (``ttaserve.engine.layer_divergence``)."""

    divergence: list[dict[str, float]] | None = None


@contextlib.contextmanager
def observe_moments(offsets: list[int] | None = None) -> Iterator[MomentLog]:
    """Collect (layer, batch mean, batch variance) of every BatchNorm2d input in this context;
    with ``offsets`` (a batch made of several requests) per segment, as [S, C]."""
    sink = MomentLog()
    token = _MOMENTS.set(sink)
    seg_token = _SEGMENTS.set(offsets)
    try:
        yield sink
    finally:
        _SEGMENTS.reset(seg_token)
        _MOMENTS.reset(token)


@dataclass
class PreparedModel:
    """A frozen, BN-swapped copy of a classifier plus what policies need to know about it.

    ``artifacts`` holds per-policy material prepared at model load (source kNN memory,
    warmed-up meta networks, a generalist twin); policies read it, never write it.
    """

    module: nn.Module
    bn_layers: list[AdaptiveBatchNorm2d]
    num_classes: int
    head_name: str
    artifacts: dict[str, Any] = field(default_factory=dict)
    _artifact_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Whether any normalizer hook runs in a forward pass (a backend running its own graph
    # only knows the hooks it has rules for): decides which requests share a pass.
    runs_hooks: ClassVar[bool] = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def bind(self, adapter: Any) -> Any:
        """The policy as it runs on this model (raises ModelError if it cannot). A torch
        model runs the adapter itself; other backends may refuse a policy (Unsupported)."""
        adapter.check(self)
        return adapter

    def architecture(self) -> str:
        """What identifies this architecture (not its weights): snapshots only restore on a
        model with the same description."""
        return ";".join(f"{k}:{tuple(v.shape)}" for k, v in self.module.state_dict().items())

    def artifact(self, key: str) -> Any:
        """A prepared artifact (e.g. ``"adanpc.memory"``). Entries may be zero-argument
        loaders; they run once, on first use, and their result is kept."""
        if key not in self.artifacts:
            raise ModelError(
                f"this model has no {key!r} artifact; build it for your model "
                f"(see 'ttaserve prepare --help') and name it in the model config"
            )
        with self._artifact_lock:
            value = self.artifacts[key]
            if callable(value) and not isinstance(value, (nn.Module, PreparedModel)):
                value = self.artifacts[key] = value()
        return value

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the input of the classifier head for the same forward pass."""
        sink: list[torch.Tensor] = []
        token = _FEATURES.set(sink)
        try:
            logits = self.module(x)
        finally:
            _FEATURES.reset(token)
        return sink[-1].flatten(1), logits

    def require_batchnorm(self, policy: str) -> None:
        if not self.bn_layers:
            raise ModelError(
                f"policy {policy!r} adapts BatchNorm statistics, but this model has no "
                "BatchNorm2d layer (was it folded into the convolutions, e.g. by ONNX "
                "optimization?). Serve it with policy 'source' or export it with BatchNorm kept."
            )


def _find_head(module: nn.Module, head: str | None) -> str:
    if head is not None:
        if head not in dict(module.named_modules()):
            raise ModelError(f"head module {head!r} not found in the model")
        return head
    linear = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ModelError("the model has no nn.Linear classifier head; name one with head=...")
    return linear[-1]


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def prepare(module: nn.Module, head: str | None = None, num_classes: int | None = None,
            channels_last: bool | None = None) -> PreparedModel:
    """Copy ``module``, freeze it, put it in eval mode, swap BatchNorm2d layers for
    :class:`AdaptiveBatchNorm2d` and tap the classifier head's input. A convolutional
    model runs channels-last (:func:`to_channels_last`) if ``channels_last`` is True; by
    default (None) when it is on the CPU (the fused GPU kernels walk NCHW rows and would
    copy every channels-last activation back)."""
    module = copy.deepcopy(module).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    head_name = _find_head(module, head)
    head_module = module.get_submodule(head_name)
    bns = [(n, m) for n, m in module.named_modules() if type(m) is nn.BatchNorm2d]
    layers = []
    for index, (name, bn) in enumerate(bns):
        layer = AdaptiveBatchNorm2d(bn, index, name)
        _set_submodule(module, name, layer)
        layers.append(layer)
    _set_submodule(module, head_name, FeatureTap(head_module))
    if num_classes is None:
        num_classes = int(getattr(head_module, "out_features", 0)) or 0
    if channels_last is None:
        channels_last = all(p.device.type == "cpu" for p in module.parameters())
    if channels_last and any(p.dim() == 4 for p in module.parameters()):  # convolutional
        to_channels_last(module)
    # A model may carry loaders for its own artifacts (the demo model does).
    artifacts = dict(getattr(module, "ttaserve_artifacts", {}))
    return PreparedModel(module.eval(), layers, num_classes, head_name, artifacts)


def _channels_last_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return args


def to_channels_last(module: nn.Module) -> None:
    """Run ``module`` in the channels-last (NHWC) memory layout: its 4-D weights are stored
    so, and a 4-D input is converted on entry (a no-op for one already in that layout).
    On CPU, oneDNN's convolutions are faster in NHWC (the demo model's forward: 1.18x at
    batch 64, 1.14x at batch 1); every tensor keeps its logical NCHW shape, so policies see
    no difference beyond float rounding (outputs agree to ~1e-6)."""
    module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # (missing from torch's stubs)
    module.register_forward_pre_hook(_channels_last_input)
