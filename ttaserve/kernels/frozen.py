"""Autograd for frozen layers that keeps only what the *input* gradient needs.

Training something upstream of a frozen network needs gradients through it, but not its
weight gradients: a frozen conv needs its weight (not its input) for backward, an eval-mode
BatchNorm only its per-channel scale, a ReLU a 1-byte mask. PyTorch's own autograd keeps the
inputs regardless (conv, batch_norm) or the 4-byte output (relu). Inside :class:`FrozenLayers`
those three ops keep only what is needed, with bit-identical forward values; everything
else runs unchanged. Used by EcoTTA, whose memory saving rests on exactly this argument.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["FrozenLayers", "masked_relu", "mean_abs_diff"]



class _FrozenConv(torch.autograd.Function):
    """conv2d with a frozen weight that keeps only the weight for backward: the input
    gradient needs no activation (what makes frozen layers cheap, the paper's argument)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(weight)
        ctx.conf = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        shape, stride, padding, dilation, groups = ctx.conf
        grad_x = torch.nn.grad.conv2d_input(shape, ctx.saved_tensors[0], grad, stride, padding, dilation, groups)
        return grad_x, None, None, None, None, None, None


class _FrozenScale(torch.autograd.Function):
    """Eval-mode BatchNorm (exactly F.batch_norm forward) keeping only its per-channel scale."""

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps):  # type: ignore[no-untyped-def]
        scale = torch.rsqrt(var + eps) * (weight if weight is not None else 1.0)
        ctx.save_for_backward(scale.view(1, -1, *([1] * (x.dim() - 2))))
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        return grad * ctx.saved_tensors[0], None, None, None, None, None


class _MaskedReLU(torch.autograd.Function):
    """ReLU keeping a 1-byte mask instead of its 4-byte output."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        out = torch.relu(x)
        ctx.save_for_backward(out > 0)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        return grad * ctx.saved_tensors[0]


class _MeanAbsDiff(torch.autograd.Function):
    """mean|a - b| keeping a and b (kept by the forward anyway), not an activation-sized
    difference as (a - b).abs().mean() would."""

    @staticmethod
    def forward(ctx, a, b):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(a, b)
        return (a - b).abs().mean()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        a, b = ctx.saved_tensors
        return torch.sign(a - b) * (grad / a.numel()), None


class FrozenLayers(TorchFunctionMode):
    """Inside this mode, conv2d / eval BatchNorm / ReLU with frozen parameters save only what
    their input gradient needs; forward values are bit-identical. Other ops are untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.conv2d:
            a = _bind(args, kwargs, _CONV_ARGS)
            if not _any_grad(a[1], a[2]) and not isinstance(a[4], str):
                return _FrozenConv.apply(*a)
        elif func is F.batch_norm:
            x, mean, var, w, b, training, _, eps = _bind(args, kwargs, _BN_ARGS)
            if not training and mean is not None and not _any_grad(w, b):
                return _FrozenScale.apply(x, mean, var, w, b, eps)
        elif func is torch.relu and len(args) == 1 and not kwargs:
            return _MaskedReLU.apply(args[0])
        return func(*args, **kwargs)


_CONV_ARGS = (("input", None), ("weight", None), ("bias", None), ("stride", 1), ("padding", 0),
              ("dilation", 1), ("groups", 1))
_BN_ARGS = (("input", None), ("running_mean", None), ("running_var", None), ("weight", None),
            ("bias", None), ("training", False), ("momentum", 0.1), ("eps", 1e-5))


def _bind(args: tuple[Any, ...], kwargs: dict[str, Any], spec: tuple[tuple[str, Any], ...]) -> list[Any]:
    return [args[i] if i < len(args) else kwargs.get(name, default) for i, (name, default) in enumerate(spec)]


def _any_grad(*tensors: torch.Tensor | None) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def masked_relu(x: torch.Tensor) -> torch.Tensor:
    """torch.relu whose backward keeps a bool mask instead of the output."""
    out: torch.Tensor = _MaskedReLU.apply(x)
    return out


def mean_abs_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean|a - b|, gradient to ``a`` only (``b`` is a detached target)."""
    out: torch.Tensor = _MeanAbsDiff.apply(a, b)
    return out
