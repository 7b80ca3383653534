"""Triton versions of :mod:`ttaserve.kernels.reference` (same arguments, same results up to
float rounding), for CUDA tensors; :mod:`ttaserve.kernels.select` decides when they run.

triton is optional: without it this module still imports, ``AVAILABLE`` is False and
every entry point raises ``RuntimeError``. Under ``TRITON_INTERPRET=1`` (set before triton
and this module are first imported) the kernels run on CPU tensors through Triton's interpreter, which is
how they are tested on machines without a GPU. None of them supports autograd.

* :func:`alpha_bn` — three launches over NCHW-contiguous ``z``: (1) mean and centred sum of
  squares of every (sample, channel) row, merged block by block with Chan's formula (no
  sum/sum-of-squares cancellation); (2) per (segment, channel) the rows of the segment are
  merged the same way, mixed with the source statistics and folded with the affine into
  one scale and shift per row; (3) ``z * scale + shift``. ``z`` is read twice and written
  once, the least a two-pass normalization can move. Statistics in fp32; the output keeps
  z's dtype (the reference follows torch's type promotion instead).
* :func:`unmix_moments` — one program per sample: cosine to the K component means, softmax,
  then the mixture mean/variance, C in blocks (K <= 1024).
* :func:`knn_topk` — one program per (16 queries x BLOCK_N keys) tile: similarities by
  ``tl.dot`` in full fp32 ("ieee", no TF32, so rankings match the reference), then the tile's
  top k' (k' = next power of two >= k) by ``tl.topk`` on int64 keys that pack the sortable
  bits of the similarity with the key index. ``torch.topk`` then merges the candidates of
  all tiles (k' of every 256-1024 keys), so the B x N similarity matrix is never written. Ties go to the lower index.
  For k > 1024 the tile sort is too large; ``knn_topk`` then computes the similarities with
  torch and says so in its docstring. Tile sizes are first guesses, not tuned on a GPU.
"""

# Annotations stay strings, so `tl.constexpr` needs no triton at import (Triton reads them).
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ttaserve.kernels.reference import vote

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
    _jit: Callable = triton.jit
except ImportError:  # optional dependency: the kernels below stay plain, never-called functions
    AVAILABLE = False

    def _jit(fn: Callable) -> Callable:
        return fn


__all__ = ["AVAILABLE", "alpha_bn", "knn_topk", "knn_vote", "unmix_moments"]

_ROW_BLOCK = 1024  # elements of one (sample, channel) row per block
_KNN_BLOCK_B, _KNN_BLOCK_D, _KNN_MAX_K = 16, 32, 1024


@_jit
def _row_moments_kernel(z_ptr, mean_ptr, m2_ptr, hw, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = z_ptr + row.to(tl.int64) * hw
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for start in range(0, hw, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < hw
        x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        n = tl.sum(mask.to(tl.float32), axis=0)
        block_mean = tl.sum(x, axis=0) / n
        d = tl.where(mask, x - block_mean, 0.0)
        total = count + n
        delta = block_mean - mean
        mean = mean + delta * (n / total)
        m2 = m2 + tl.sum(d * d, axis=0) + delta * delta * (count * n / total)
        count = total
    tl.store(mean_ptr + row, mean)
    tl.store(m2_ptr + row, m2)


@_jit
def _segment_scale_kernel(row_mean, row_m2, offsets, src_mean, src_var, weight, bias,
                          scale_ptr, shift_ptr, C, hw, alpha, eps,
                          HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr):
    seg = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    start = tl.load(offsets + seg)
    stop = tl.load(offsets + seg + 1)
    rows = (stop - start).to(tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for b in range(start, stop):
        acc += tl.load(row_mean + b * C + cols, mask=cmask, other=0.0)
    mean = acc / rows
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for b in range(start, stop):  # Chan's merge of equal-sized rows
        d = tl.load(row_mean + b * C + cols, mask=cmask, other=0.0) - mean
        m2 += tl.load(row_m2 + b * C + cols, mask=cmask, other=0.0) + hw * d * d
    var = m2 / (rows * hw)
    mixed_mean = alpha * tl.load(src_mean + cols, mask=cmask, other=0.0) + (1.0 - alpha) * mean
    mixed_var = alpha * tl.load(src_var + cols, mask=cmask, other=1.0) + (1.0 - alpha) * var
    scale = 1.0 / tl.sqrt(mixed_var + eps)
    if HAS_WEIGHT:
        scale = scale * tl.load(weight + cols, mask=cmask, other=1.0)
    shift = -mixed_mean * scale
    if HAS_BIAS:
        shift = shift + tl.load(bias + cols, mask=cmask, other=0.0)
    for b in range(start, stop):  # per sample, so the normalize pass needs no segment lookup
        tl.store(scale_ptr + b * C + cols, scale, mask=cmask)
        tl.store(shift_ptr + b * C + cols, shift, mask=cmask)


@_jit
def _affine_kernel(z_ptr, out_ptr, scale_ptr, shift_ptr, hw, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    scale = tl.load(scale_ptr + row)
    shift = tl.load(shift_ptr + row)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < hw
    base = row.to(tl.int64) * hw
    x = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + base + offs, (x * scale + shift).to(out_ptr.dtype.element_ty), mask=mask)


def _require() -> None:
    if not AVAILABLE:
        raise RuntimeError("the Triton kernels need the optional 'triton' package")


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
    """As :func:`ttaserve.kernels.reference.alpha_bn`; statistics in fp32, output in z's dtype."""
    _require()
    z = z.contiguous()  # channels-last input is copied: the kernels walk NCHW rows
    batch, channels = z.shape[0], z.shape[1]
    hw = z[0, 0].numel()
    bounds = [0, batch] if offsets is None else list(offsets)
    rows = batch * channels
    stats = torch.empty(2, rows, device=z.device, dtype=torch.float32)
    _row_moments_kernel[(rows,)](z, stats[0], stats[1], hw, BLOCK=_block(hw, _ROW_BLOCK))
    segments = len(bounds) - 1
    bound_t = torch.tensor(bounds, dtype=torch.int32).to(z.device, non_blocking=True)
    folded = torch.empty(2, rows, device=z.device, dtype=torch.float32)  # scale, shift per row
    block_c = _block(channels, 256)
    _segment_scale_kernel[(segments, triton.cdiv(channels, block_c))](
        stats[0], stats[1], bound_t, _f32(source_mean), _f32(source_var), _f32(weight), _f32(bias),
        folded[0], folded[1], channels, hw, float(alpha), float(eps),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_C=block_c,
    )
    out = torch.empty_like(z)
    block = _block(hw, _ROW_BLOCK)
    _affine_kernel[(rows, triton.cdiv(hw, block))](z, out, folded[0], folded[1], hw, BLOCK=block)
    return out


@_jit
def _unmix_kernel(inst_mean, inst_var, means, variances, out_mean, out_var, p_out, C, K, inv_tau,
                  BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    dot = tl.zeros([BLOCK_K], dtype=tl.float32)
    comp_sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    inst_sq = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = kmask[:, None] & (cols < C)[None, :]
        x = tl.load(inst_mean + b * C + cols, mask=cols < C, other=0.0)
        m = tl.load(means + ks[:, None] * C + cols[None, :], mask=mask, other=0.0)
        dot += tl.sum(m * x[None, :], axis=1)
        comp_sq += tl.sum(m * m, axis=1)
        inst_sq += x * x
    # F.normalize divides by max(norm, 1e-12): same guard for zero vectors.
    inst_norm = tl.maximum(tl.sqrt(tl.sum(inst_sq, axis=0)), 1e-12)
    logits = dot / (inst_norm * tl.maximum(tl.sqrt(comp_sq), 1e-12)) * inv_tau
    logits = tl.where(kmask, logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=0))
    p = e / tl.sum(e, axis=0)
    tl.store(p_out + b * K + ks, p, mask=kmask)
    w = tl.where(kmask, p, 0.0)[:, None]
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = kmask[:, None] & (cols < C)[None, :]
        x = tl.load(inst_mean + b * C + cols, mask=cols < C, other=0.0)
        v = tl.load(inst_var + b * C + cols, mask=cols < C, other=0.0)
        m = tl.load(means + ks[:, None] * C + cols[None, :], mask=mask, other=0.0)
        s = tl.load(variances + ks[:, None] * C + cols[None, :], mask=mask, other=0.0)
        mixed_mean = (1.0 - w) * m + w * x[None, :]
        mixed_var = (1.0 - w) * s + w * v[None, :]
        mean = tl.sum(tl.where(mask, mixed_mean, 0.0), axis=0) / K
        centred = tl.where(mask, mixed_mean - mean[None, :], 0.0)
        var = tl.sum(tl.where(mask, mixed_var, 0.0), axis=0) / K + tl.sum(centred * centred, axis=0) / K
        tl.store(out_mean + b * C + cols, mean, mask=cols < C)
        tl.store(out_var + b * C + cols, var, mask=cols < C)


def unmix_moments(
    inst_mean: torch.Tensor,
    inst_var: torch.Tensor,
    means: torch.Tensor,
    variances: torch.Tensor,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As :func:`ttaserve.kernels.reference.unmix_moments` (fp32 in and out, K <= 1024)."""
    _require()
    (batch, channels), k = inst_mean.shape, means.shape[0]
    if k > 1024:
        raise ValueError(f"the Triton un-mixing kernel holds all K components at once; K={k} > 1024")
    block_k = _block(k, 1024)
    block_c = max(16, min(_block(channels, 256), 4096 // block_k))
    out = torch.empty(2, batch, channels, device=inst_mean.device, dtype=torch.float32)
    p = torch.empty(batch, k, device=inst_mean.device, dtype=torch.float32)
    _unmix_kernel[(batch,)](
        _f32(inst_mean), _f32(inst_var), _f32(means), _f32(variances), out[0], out[1], p,
        channels, k, 1.0 / tau, BLOCK_K=block_k, BLOCK_C=block_c,
    )
    return out[0], out[1], p


@_jit
def _knn_tile_topk_kernel(q_ptr, k_ptr, out_ptr, B, N, D, n_tiles,
                          BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          KP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    tile = tl.program_id(1)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        ds = start + tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + rows[:, None] * D + ds[None, :], mask=(rows < B)[:, None] & (ds < D)[None, :], other=0.0)
        kt = tl.load(k_ptr + cols[None, :] * D + ds[:, None], mask=(cols < N)[None, :] & (ds < D)[:, None], other=0.0)
        acc = tl.dot(q, kt, acc, input_precision="ieee")
    # Order-preserving int32 image of the float, packed above the (reversed) key index so
    # one integer sort ranks by similarity and breaks ties toward the lower index.
    bits = acc.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    packed = (bits.to(tl.int64) << 32) | (0x7FFFFFFF - cols).to(tl.int64)[None, :]
    packed = tl.where((cols < N)[None, :], packed, -0x7FFFFFFFFFFFFFFF)
    top = tl.topk(packed, KP)
    slots = tl.arange(0, KP)
    dest = out_ptr + rows[:, None].to(tl.int64) * (n_tiles * KP) + tile * KP + slots[None, :]
    tl.store(dest, top, mask=(rows < B)[:, None])


def knn_topk(query: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`ttaserve.kernels.reference.knn_topk` (fp32). For k > 1024 the similarity
    matrix is computed by torch (matmul + topk): a tile sort that large would not fit."""
    _require()
    batch, dim = query.shape
    count = keys.shape[0]
    if k > _KNN_MAX_K:
        return (query.float() @ keys.float().T).topk(min(k, count), dim=1)
    kp = _block(k, _KNN_MAX_K)
    block_n = max(256, min(1024, 4 * kp))  # a tile keeps kp of block_n: >= 4x fewer bytes out
    n_tiles = triton.cdiv(count, block_n)
    candidates = torch.empty(batch, n_tiles * kp, device=query.device, dtype=torch.int64)
    grid = (triton.cdiv(batch, _KNN_BLOCK_B), n_tiles)
    _knn_tile_topk_kernel[grid](
        _f32(query), _f32(keys), candidates, batch, count, dim, n_tiles,
        BLOCK_B=_KNN_BLOCK_B, BLOCK_N=block_n, BLOCK_D=_KNN_BLOCK_D, KP=kp,
        num_warps=8 if block_n >= 512 else 4,
    )
    best = candidates.topk(min(k, count), dim=1).values
    high = (best >> 32).to(torch.int32)
    values = torch.where(high < 0, high ^ 0x7FFFFFFF, high).view(torch.float32)
    return values, 0x7FFFFFFF - (best & 0xFFFFFFFF)


def knn_vote(
    query: torch.Tensor,
    keys: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
) -> torch.Tensor:
    """As :func:`ttaserve.kernels.reference.knn_vote`; the vote itself (B x k) is torch."""
    values, index = knn_topk(query, keys, k)
    return vote(values, labels[index], temperature, num_classes)


def _block(n: int, cap: int) -> int:
    """The power of two >= n, at most cap (at least 1)."""
    return min(cap, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float32).contiguous()
