"""Torch references of the fused operations: the definition of what each fused version
computes, and the implementation used on CPU (see :mod:`ttaserve.kernels.select`).

* :func:`alpha_bn`: (segmented) batch statistics mixed with source statistics, then
  normalization — the whole of one ``alpha-bn`` BatchNorm layer.
* :func:`unmix_moments`: UnMix-TNS per-sample statistics from instance moments and K
  components (soft assignment + un-mixing).
* :func:`knn_topk` / :func:`knn_vote`: AdaNPC's top-k cosine search and softmax vote.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ttaserve.kernels.norm import batch_moments, normalize, segment_moments

__all__ = [
    "alpha_bn",
    "knn_topk",
    "knn_vote",
    "soft_assignment",
    "unmix_moments",
    "unmixed_moments",
    "vote",
]


def alpha_bn(
    z: torch.Tensor,
    offsets: list[int] | None,
    source_mean: torch.Tensor,
    source_var: torch.Tensor,
    alpha: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """Normalize ``z`` with alpha * source + (1 - alpha) * batch statistics.

    ``offsets=None`` takes the statistics over the whole batch (per-channel [C], so the
    normalization runs through ``F.batch_norm``); a list ``[0, ..., B]`` takes them over each
    segment ``z[offsets[i]:offsets[i+1]]`` separately. The two agree up to rounding when the
    list has one segment; both forms are kept so each caller's results stay bit-identical."""
    if offsets is None:
        mean_t, var_t = batch_moments(z)
    else:
        mean_t, var_t = segment_moments(z, offsets)
    return alpha_bn_with(z, mean_t, var_t, source_mean, source_var, alpha, weight, bias, eps)


def alpha_bn_with(
    z: torch.Tensor,
    mean_t: torch.Tensor,
    var_t: torch.Tensor,
    source_mean: torch.Tensor,
    source_var: torch.Tensor,
    alpha: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """:func:`alpha_bn` with the test statistics already known ([C], or [B, C] per sample)."""
    mean = alpha * source_mean + (1.0 - alpha) * mean_t
    var = alpha * source_var + (1.0 - alpha) * var_t
    return normalize(z, mean, var, weight, bias, eps)


def soft_assignment(inst_mean: torch.Tensor, means: torch.Tensor, tau: float) -> torch.Tensor:
    """p (B x K): softmax over components of the cosine similarity of instance and
    component means, sharpened by tau."""
    cosine = F.normalize(inst_mean, dim=1) @ F.normalize(means, dim=1).T
    return torch.softmax(cosine / tau, dim=1)


def unmixed_moments(
    inst_mean: torch.Tensor,
    inst_var: torch.Tensor,
    means: torch.Tensor,
    variances: torch.Tensor,
    p: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample statistics (B x C): each component pulled toward the sample by p_bk,
    then the mixture's mean and variance (law of total variance)."""
    batch, k, channels = p.shape[0], means.shape[0], means.shape[1]
    # (1 - w)·M_k + w·μ_b as one lerp (exactly μ_b where w = 1): B x K x C
    mixed_mean = torch.lerp(means.expand(batch, k, channels), inst_mean.unsqueeze(1).expand(batch, k, channels),
                            p.unsqueeze(-1))
    mean = mixed_mean.mean(dim=1)
    # Centred form: cannot round below zero, and K = 1 gives the instance variance exactly.
    spread = (mixed_mean - mean.unsqueeze(1)).square_().mean(dim=1)
    # mean_k of (1 - w)·V_k + w·σ²_b without a B x K x C tensor: (Σ_k V_k − p·V + (Σ_k p)·σ²_b) / K
    mixed_var = (variances.sum(dim=0) - p @ variances + p.sum(dim=1, keepdim=True) * inst_var) / k
    return mean, mixed_var + spread


def unmix_moments(
    inst_mean: torch.Tensor,
    inst_var: torch.Tensor,
    means: torch.Tensor,
    variances: torch.Tensor,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UnMix-TNS statistics of one layer: per-sample mean and variance [B, C] and the soft
    assignment p [B, K] (which the component update needs afterwards)."""
    p = soft_assignment(inst_mean, means, tau)
    mean, var = unmixed_moments(inst_mean, inst_var, means, variances, p)
    return mean, var, p


def knn_topk(query: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The min(k, N) largest similarities query @ keys.T per row [B, k'], best first, and
    the keys' indices. Rows of both are expected L2-normalized (cosine similarity)."""
    sims = query @ keys.T
    values, index = sims.topk(min(k, keys.shape[0]), dim=1)
    return values, index


def knn_vote(
    query: torch.Tensor,
    keys: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
) -> torch.Tensor:
    """Class scores [B, num_classes]: the softmax(similarity / temperature) weights of the
    top-k neighbours summed per neighbour label (AdaNPC's vote, before its score floor)."""
    values, index = knn_topk(query, keys, k)
    return vote(values, labels[index], temperature, num_classes)


def vote(values: torch.Tensor, labels: torch.Tensor, temperature: float, num_classes: int) -> torch.Tensor:
    """Sum of softmax(values / temperature) per label: [B, k'] neighbours -> [B, num_classes]."""
    weights = torch.softmax(values / temperature, dim=1)
    scores = torch.zeros(values.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return scores.scatter_add_(1, labels, weights)
