"""Batched image primitives behind :mod:`ttaserve.bench.corruptions`.

Every function takes a float tensor ``[N, C, H, W]`` and works on the whole batch at once
(convolutions, gathers and ``grid_sample`` instead of a Python loop per image), so a
corrupted 10k-image test set takes seconds. Randomness always comes from an explicit
``torch.Generator``; nothing touches global random state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "box_pixelate",
    "clipped_zoom",
    "disk_blur",
    "frost_textures",
    "gaussian_blur",
    "jpeg_roundtrip",
    "motion_blur",
    "plasma_fractal",
    "warp",
    "zoom_blur",
]

# ITU-T T.81 Annex K luminance quantisation table (the one libjpeg scales by quality).
_JPEG_LUMA = torch.tensor(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=torch.float32,
)


def _per_channel(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, 1, x.shape[-2], x.shape[-1])


def _source_index(i: int, n: int, mode: str) -> int | None:
    """Which pixel of a length-``n`` line stands at position ``i`` once it is padded."""
    if 0 <= i < n:
        return i
    if mode == "replicate":
        return min(max(i, 0), n - 1)
    if mode == "reflect":  # mirror about the edge pixels (OpenCV's REFLECT_101)
        period = 2 * (n - 1)
        i = abs(i) % period
        return period - i if i >= n else i
    return None  # zero padding


def _axis_matrix(kernel: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """A centred 1-D correlation with ``kernel`` on a length-``n`` line as an ``[n, n]``
    matrix, boundary handling folded in. Tiny images make matrix products far cheaper
    than single-channel convolutions."""
    r = (len(kernel) - 1) // 2
    m = torch.zeros(n, n)
    for i in range(n):
        for t, weight in enumerate(kernel.tolist()):
            j = _source_index(i + t - r, n, mode)
            if j is not None:
                m[i, j] += weight
    return m


def gaussian_blur(
    x: torch.Tensor, sigma: float, truncate: float = 4.0, mode: str = "replicate"
) -> torch.Tensor:
    """Separable Gaussian blur; the support ends at ``truncate`` sigmas (as skimage's filter).
    ``mode`` is the boundary: "replicate", "reflect" or "constant" (zeros)."""
    if sigma <= 0:
        return x
    r = max(1, int(truncate * sigma + 0.5))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    rows = _axis_matrix(k, x.shape[-2], mode).to(x.device)
    cols = _axis_matrix(k, x.shape[-1], mode).to(x.device)
    return rows @ x @ cols.T


def disk_blur(x: torch.Tensor, radius: float, alias_sigma: float) -> torch.Tensor:
    """Defocus: convolve with a pixel disk softened by a 3x3 Gaussian (ImageNet-C's kernel),
    edges mirrored."""
    half = int(math.ceil(radius)) + 1
    t = torch.arange(-half, half + 1, dtype=torch.float32)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius**2).float()
    # truncate = 1 / sigma gives the one-pixel (3x3) support of the reference's anti-aliasing.
    soft = gaussian_blur(disk, alias_sigma, truncate=1 / alias_sigma, mode="constant")
    kernel = soft / soft.sum()
    n, c, h, w = x.shape
    # Correlation = sum over kernel rows a of (shift rows by a) (x) (correlate columns with
    # kernel row a), one dense [H*W, H*W] operator applied as a single matrix product.
    operator = torch.zeros(h * w, h * w)
    for a, kernel_row in enumerate(kernel):
        shift_rows = _axis_matrix(torch.eye(2 * half + 1)[a], h, "reflect")
        operator += torch.kron(shift_rows, _axis_matrix(kernel_row, w, "reflect"))
    return (x.reshape(n * c, h * w) @ operator.T.to(x.device)).view(n, c, h, w)


def motion_blur(
    x: torch.Tensor, radius: int, sigma: float, angles_deg: torch.Tensor
) -> torch.Tensor:
    """ImageMagick-style motion blur: a one-sided Gaussian streak of ``2*radius+1`` taps
    along each image's own angle (one angle per image), edges replicated."""
    taps = torch.arange(2 * radius + 1, dtype=torch.float32)
    weights = torch.exp(-(taps**2) / (2 * sigma**2))
    weights = weights / weights.sum()
    n, c, h, w = x.shape
    reach = int(taps[weights >= 1e-6].max().item())  # taps below 1e-6 change nothing visible
    padded = F.pad(_per_channel(x), (reach, reach, reach, reach), mode="replicate")
    padded = padded.reshape(n, c, -1)
    wp = w + 2 * reach
    window = ((torch.arange(h)[:, None] + reach) * wp + torch.arange(w)[None, :] + reach).view(
        1, 1, h * w
    )
    rad = torch.deg2rad(angles_deg.float())
    steps = torch.arange(reach + 1, dtype=torch.float32)[:, None]
    # Pixel p takes the value i steps back along the streak: one gather per tap i.
    shifts = (
        torch.round(steps * torch.sin(rad)).long() * wp + torch.round(steps * torch.cos(rad)).long()
    )
    out = torch.zeros(n, c, h * w, device=x.device)
    for i in range(reach + 1):
        index = (window - shifts[i].view(n, 1, 1)).to(x.device).expand(n, c, h * w)
        out += weights[i].item() * padded.gather(2, index)
    return out.view(n, c, h, w)


def _zoom_matrix(n: int, factor: float) -> torch.Tensor:
    """Linear interpolation of a length-``n`` line magnified ``factor`` times about its
    centre, as an ``[n, n]`` matrix (edge pixels repeat past the border)."""
    source = (torch.arange(n, dtype=torch.float64) + 0.5 - n / 2) / factor + n / 2 - 0.5
    source = source.clamp(0, n - 1)
    low = source.floor().long()
    high = (low + 1).clamp(max=n - 1)
    frac = source - low
    m = torch.zeros(n, n, dtype=torch.float64)
    m[torch.arange(n), low] += 1 - frac
    m[torch.arange(n), high] += frac
    return m.float()


def clipped_zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Zoom in by ``factor`` >= 1 about the centre, keeping the size (bilinear)."""
    rows, cols = _zoom_matrix(x.shape[-2], factor), _zoom_matrix(x.shape[-1], factor)
    return rows.to(x.device) @ x @ cols.T.to(x.device)


def zoom_blur(x: torch.Tensor, factors: list[float]) -> torch.Tensor:
    """Average of the image and its centre zooms by each factor. Each zoom is separable,
    and their average is one linear map of the pixels: it is assembled as a sum of
    Kronecker products and applied to the batch as a single matrix product."""
    n, c, h, w = x.shape
    operator = torch.eye(h * w)
    for factor in factors:
        operator += torch.kron(_zoom_matrix(h, factor), _zoom_matrix(w, factor))
    operator = (operator / (len(factors) + 1)).to(x.device)
    return (x.reshape(n * c, h * w) @ operator.T).view(n, c, h, w)


def warp(x: torch.Tensor, src_rows: torch.Tensor, src_cols: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling at per-pixel source coordinates ``[N, H, W]`` (pixel units),
    reflecting at the borders."""
    h, w = x.shape[-2:]
    grid = torch.stack((2 * src_cols / (w - 1) - 1, 2 * src_rows / (h - 1) - 1), dim=-1)
    return F.grid_sample(
        x, grid.float(), mode="bilinear", padding_mode="reflection", align_corners=True
    )


def plasma_fractal(n: int, size: int, decay: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` diamond-square height maps ``[n, size, size]`` in [0, 1] (``size`` a power of
    two). As in ImageNet-C's fog, level k's noise amplitude is ``(100 / decay**k) ** 2``."""
    if size & (size - 1):
        raise ValueError(f"plasma size must be a power of two, got {size}")
    m = torch.zeros(n, size, size, dtype=torch.float64)
    step, wibble = size, 100.0

    def noisy_mean(total: torch.Tensor) -> torch.Tensor:
        noise = torch.rand(total.shape, generator=generator, dtype=torch.float64) * 2 - 1
        return total / 4 + wibble**2 * noise

    while step >= 2:
        half = step // 2
        corners = m[:, ::step, ::step]
        square = corners + corners.roll(-1, 1)
        m[:, half::step, half::step] = noisy_mean(square + square.roll(-1, 2))
        centres, corners = m[:, half::step, half::step], m[:, ::step, ::step]
        m[:, ::step, half::step] = noisy_mean(
            centres + centres.roll(1, 1) + corners + corners.roll(-1, 2)
        )
        m[:, half::step, ::step] = noisy_mean(
            centres + centres.roll(1, 2) + corners + corners.roll(-1, 1)
        )
        step, wibble = half, wibble / decay
    lo = m.amin(dim=(1, 2), keepdim=True)
    hi = m.amax(dim=(1, 2), keepdim=True)
    return ((m - lo) / (hi - lo)).float()


def frost_textures(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` procedural frost sheets ``[count, 1, size, size]`` in [0, 1].

    Stands in for ImageNet-C's six frost photographs, matching their statistics once
    shrunk to CIFAR scale (measured: overall level 0.35-0.8, local std 0.04-0.10): a
    bright level per sheet, a cloudy plasma layer, and needle-like crystals made by
    streaking sparse seeds along three directions."""
    level = 0.35 + 0.45 * torch.rand(count, 1, 1, 1, generator=generator)
    cloud = plasma_fractal(count, size, 2.0, generator).unsqueeze(1) - 0.5
    needles = torch.zeros(count, 1, size, size)
    for _ in range(3):
        seeds = (torch.rand(count, 1, size, size, generator=generator) < 0.04).float()
        angles = torch.rand(count, generator=generator) * 360
        needles += motion_blur(seeds, radius=4, sigma=2.5, angles_deg=angles)
    needles = gaussian_blur(needles, 0.5)
    return (level + 0.2 * cloud + 0.6 * (needles - needles.mean())).clamp(0, 1)


def _box_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Pillow's BOX resampling along one axis as an ``[n_out, n_in]`` matrix: an output pixel
    averages the input pixels whose centres fall inside its footprint (at least one)."""
    scale = n_in / n_out
    support = max(scale, 1.0) / 2
    centres = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale
    offsets = torch.arange(n_in, dtype=torch.float64) + 0.5 - centres[:, None]
    weights = ((offsets > -support) & (offsets <= support)).double()
    return (weights / weights.sum(dim=1, keepdim=True)).float()


def box_pixelate(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Shrink each side to ``int(side * factor)`` pixels with a box filter and blow back up
    (Pillow's BOX both ways, as ImageNet-C's pixelate)."""
    h, w = x.shape[-2:]
    sh, sw = max(1, int(h * factor)), max(1, int(w * factor))
    rows = _box_matrix(sh, h) @ _box_matrix(h, sh)
    cols = _box_matrix(sw, w) @ _box_matrix(w, sw)
    return torch.einsum("ij,ncjk,lk->ncil", rows.to(x.device), x, cols.to(x.device))


def _dct_matrix() -> torch.Tensor:
    k = torch.arange(8, dtype=torch.float64)
    c = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    c[0] /= math.sqrt(2)
    return c.float()


def jpeg_table(quality: int) -> torch.Tensor:
    """libjpeg's luminance table for ``quality`` in 1..100 (baseline, entries 1..255)."""
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return torch.clamp(torch.floor((_JPEG_LUMA * scale + 50) / 100), 1, 255)


def jpeg_roundtrip(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode and decode one-channel 8-bit JPEG: 8x8 DCT, quantise with the quality-scaled
    table, dequantise, inverse DCT. Entropy coding is lossless, so it is skipped; edges are
    replicated up to a multiple of 8 as libjpeg does."""
    n, c, h, w = x.shape
    ph, pw = -h % 8, -w % 8
    pixels = torch.round(x.clamp(0, 1) * 255) - 128
    pixels = F.pad(_per_channel(pixels), (0, pw, 0, ph), mode="replicate")
    blocks = pixels.unfold(2, 8, 8).unfold(3, 8, 8)  # [NC, 1, H/8, W/8, 8, 8]
    dct, table = _dct_matrix().to(x.device), jpeg_table(quality).to(x.device)
    coeffs = dct @ blocks @ dct.T
    decoded = dct.T @ (torch.round(coeffs / table) * table) @ dct
    decoded = decoded.permute(0, 1, 2, 4, 3, 5).reshape(n * c, 1, h + ph, w + pw)
    out = torch.clamp(torch.round(decoded + 128), 0, 255) / 255
    return out[..., :h, :w].reshape(n, c, h, w)
