"""Torch reference implementations of the normalization statistics the policies use.

All variances are biased (divide by n), as BatchNorm uses them at test time. Shapes:
``z`` is B x C x H x W (or B x C); per-channel moments are [C]; per-sample moments [B, C].
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _spatial_dims(z: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, z.dim()))


def batch_moments(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per channel over (B, H, W).

    Two passes (mean, then mean of squared deviations) instead of ``torch.var_mean``: on
    CPU, var_mean over the non-adjacent dims (0, 2, 3) took 21 ms for a 64x16x28x28
    activation where this takes 1.1 ms, with the same precision (1e-7)."""
    dims = (0, *_spatial_dims(z))
    mean = z.mean(dim=dims, keepdim=True)
    var = (z - mean).square_().mean(dim=dims)
    return mean.flatten(), var


def instance_moments(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per sample and channel over (H, W): [B, C] each (two
    passes, as :func:`batch_moments`: ~60x faster than torch.var_mean over (2, 3) on CPU)."""
    dims = _spatial_dims(z)
    if not dims:  # [B, C]: one value per instance and channel
        return z, torch.zeros_like(z)
    mean = z.mean(dim=dims, keepdim=True)
    var = (z - mean).square_().mean(dim=dims)
    return mean.flatten(1), var


def pooled_moments(inst_mean: torch.Tensor, inst_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch moments [C] from per-sample moments [B, C] (law of total variance: the mean of
    the instance variances plus the variance of the instance means)."""
    mean = inst_mean.mean(dim=0)
    return mean, inst_var.mean(dim=0) + (inst_mean - mean).square().mean(dim=0)


def segment_moments(
    z: torch.Tensor, offsets: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch moments computed separately for each segment ``z[offsets[i]:offsets[i+1]]``,
    broadcast back to [B, C]. Each segment is reduced exactly as :func:`batch_moments` would
    reduce it alone, so a segment's result does not depend on its neighbours."""
    pairs = [batch_moments(z[start:stop]) for start, stop in zip(offsets[:-1], offsets[1:])]
    return per_sample(torch.stack([m for m, _ in pairs]), offsets), per_sample(torch.stack([v for _, v in pairs]), offsets)


def per_sample(rows: torch.Tensor, offsets: Sequence[int]) -> torch.Tensor:
    """Per-segment statistics [S, C] repeated for each sample of their segment: [B, C]."""
    return rows.repeat_interleave(_lengths(tuple(offsets)).to(rows.device), dim=0)


@functools.lru_cache(maxsize=256)
def _lengths(offsets: tuple[int, ...]) -> torch.Tensor:
    # once per pass layout rather than per layer and statistic (read-only once made)
    return torch.tensor([b - a for a, b in zip(offsets[:-1], offsets[1:])])


def normalize(
    z: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """weight * (z - mean) / sqrt(var + eps) + bias, with per-channel [C] or per-sample
    [B, C] statistics and per-channel or per-sample affine parameters.

    The all-per-channel case goes through ``F.batch_norm`` (eval mode), the same code the
    original layer runs, so source statistics reproduce the source output bit for bit."""
    if mean.dim() == 1 and _per_channel(weight) and _per_channel(bias):
        return F.batch_norm(z, mean, var, weight, bias, False, 0.0, eps)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return z * _expand(z, scale) + _expand(z, shift)


def _per_channel(param: torch.Tensor | None) -> bool:
    return param is None or param.dim() == 1


def _expand(z: torch.Tensor, stat: torch.Tensor) -> torch.Tensor:
    """View a [C] or [B, C] statistic so that it broadcasts against z."""
    extra = (1,) * (z.dim() - 2)
    if stat.dim() == 1:
        return stat.reshape(1, stat.shape[0], *extra)
    return stat.reshape(stat.shape[0], stat.shape[1], *extra)
