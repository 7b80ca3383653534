"""Fashion-MNIST-C: the 15 ImageNet-C corruptions at severities 1-5 for small gray images.

Implemented from Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations" (ICLR 2019), with the per-severity constants of the
paper's 32x32 variant (CIFAR-10-C), the member of the family closest to 28x28.

Why not a PyPI library: ``imagecorruptions`` refuses images under 32 px and no longer runs
on NumPy 2 / scikit-image >= 0.19; ``corrupt-tta`` wants 3-channel input and keeps the
224-px ImageNet constants (a radius-10 defocus on a 28-px image leaves nothing); both need
OpenCV and scikit-image, draw from NumPy's global random state and loop in Python per
image (up to ~7 ms an image). Here everything is batched torch code.

Adapting the constants to 28x28 (documented choices):
- The three noises take ImageNet-C's per-severity levels, not CIFAR-10-C's: on
  Fashion-MNIST, CIFAR-10-C's noise left the demo model at 32 % error at severity 5, far
  from the 60-85 % the family is meant to reach; ImageNet-C's give 84 % (gaussian) and
  73 % (impulse). Shot noise stays milder (38 %): Poisson noise is zero where the image is
  black, and Fashion-MNIST's background is black.
- Constants that are fractions of the image side (elastic displacement, affine jitter and
  smoothness; the pixelate ratio) are taken times 28 instead of 32.
- Constants in pixels (blur radii, motion streaks, zoom factors, snow flake sizes) are kept
  as CIFAR-10-C has them: scaling by 28/32 would move the discrete disk radii across
  integer boundaries and make defocus severities non-monotone, while 28 is within 12 % of
  32.
- Constants on pixel values (noise levels, brightness, contrast, JPEG quality, fog and
  frost blending) do not depend on size and are kept.
- Three CIFAR-10-C ladders are not monotone on 28x28 gray images (measured mean absolute
  change and demo-model error fall between some severities), so they are reordered or
  nudged to be: glass blur uses CIFAR-10-C's own (sigma, delta, passes) tuples sorted by
  measured strength, with a third swap pass at severity 5 (ImageNet-C uses three);
  elastic takes the affine jitters in increasing order (CIFAR-10-C shrinks them as the
  elastic part grows, so its severity 1 moved pixels most); frost raises the frost weight
  of severities 4 and 5 by 0.05 each (0.45, 0.5) so that it grows as the image weight falls.
- Frost: ImageNet-C blends in crops of six frost photographs. None ship here, so a seeded
  procedural frost sheet stands in (``image_ops.frost_textures``), tuned to the photos'
  statistics at CIFAR scale (level 0.35-0.8, local std 0.04-0.1); the blend weights are
  the table's.
- Glass blur, motion blur and snow follow the reference algorithms (sequential local pixel
  swaps; ImageMagick's one-sided Gaussian streak); elastic composes the random affine and
  the displacement field into one bilinear resampling instead of two.
- JPEG is re-implemented (8x8 DCT, libjpeg's quality-scaled luminance table): it differs
  from Pillow's encoder by 0.2 gray levels on average (integer vs float DCT); pixelate
  equals Pillow's BOX resize up to rounding.
- Brightness on a gray image: adding to HSV value is adding to the gray level.
- Outputs are rounded to 8-bit levels, as the stored ImageNet-C / CIFAR-10-C sets are.

Determinism: every random draw comes from a ``torch.Generator`` seeded with ``seed``, so
the same batch, corruption, severity and seed give the same images. An image's result
depends on the whole batch it was corrupted with (draws are made for the batch at once):
corrupt a test set in one call. The work runs on the CPU; the result goes back to the
input's device.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Integral

import torch

from ttaserve.bench import image_ops as ops

__all__ = ["CORRUPTIONS", "GENERALIST_SEEN", "SEVERITIES", "corrupt"]

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# The corruption families the T3 generalist twin was trained against (models/train.py,
# ``augment``: additive noise, contrast and brightness jitter); T3 is also reported on the
# others, which neither of its models saw.
GENERALIST_SEEN: tuple[str, ...] = ("gaussian_noise", "shot_noise", "impulse_noise", "brightness", "contrast")

# Per-severity constants (severity 1..5): CIFAR-10-C's, except where the module docstring says.
_CONSTANTS: dict[str, tuple] = {
    # Noise: ImageNet-C's levels (CIFAR-10-C's are tuned for 32-px color images and left
    # this model at 32 % error at severity 5; these give 60-85 % on gaussian and impulse).
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),  # noise std
    "shot_noise": (60, 25, 12, 5, 3),  # photons at white
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),  # fraction of pixels hit
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # radius, alias
    "glass_blur": (
        (0.4, 1, 1),
        (0.25, 1, 1),
        (0.4, 1, 2),
        (0.25, 1, 2),
        (0.4, 1, 3),
    ),  # sigma, delta, iters
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),  # radius, sigma
    "zoom_blur": (6, 11, 16, 21, 26),  # zoom factors 1.00, 1.01, ...
    "snow": (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),  # loc, scale, zoom, threshold, radius, sigma, mix
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.45), (0.75, 0.5)),  # image, frost weight
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),  # strength, decay
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to the value
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # scale about the image mean
    "elastic_transform": (  # displacement, smoothness, affine jitter (fractions of the side)
        (0.0, 0.0, 0.03),
        (0.05, 0.2, 0.05),
        (0.08, 0.06, 0.06),
        (0.1, 0.04, 0.07),
        (0.1, 0.03, 0.08),
    ),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # side ratio of the shrunken image
    "jpeg_compression": (80, 65, 58, 50, 40),  # quality
}

_FROST_SHEETS = 6  # as many as ImageNet-C's frost photographs


def _gaussian_noise(x: torch.Tensor, std: float, g: torch.Generator) -> torch.Tensor:
    return x + std * torch.randn(x.shape, generator=g)


def _shot_noise(x: torch.Tensor, photons: float, g: torch.Generator) -> torch.Tensor:
    return torch.poisson(x * photons, generator=g) / photons


def _impulse_noise(x: torch.Tensor, amount: float, g: torch.Generator) -> torch.Tensor:
    hit = torch.rand(x.shape, generator=g) < amount
    salt = (torch.rand(x.shape, generator=g) < 0.5).to(x.dtype)
    return torch.where(hit, salt, x)


def _defocus_blur(x: torch.Tensor, c: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    return ops.disk_blur(x, radius=c[0], alias_sigma=c[1])


def _glass_blur(x: torch.Tensor, c: tuple[float, int, int], g: torch.Generator) -> torch.Tensor:
    sigma, delta, iterations = c
    n, ch, h, w = x.shape
    flat = ops.gaussian_blur(x, sigma).reshape(n, ch, h * w).clone()
    positions = [
        (r, col) for r in range(h - delta, delta, -1) for col in range(w - delta, delta, -1)
    ]
    # The reference swaps with an offset in [-delta, delta): the same half-open range here.
    offsets = torch.randint(-delta, delta, (iterations, len(positions), n, 2), generator=g)
    for it in range(iterations):
        # Swaps are sequential per image (a pixel can travel), but vectorised over the batch.
        for k, (r, col) in enumerate(positions):
            here = r * w + col
            there = (
                ((r + offsets[it, k, :, 0]) * w + col + offsets[it, k, :, 1])
                .view(n, 1, 1)
                .expand(n, ch, 1)
            )
            mine = flat[:, :, here].clone()
            flat[:, :, here] = flat.gather(2, there).squeeze(2)
            flat.scatter_(2, there, mine.unsqueeze(2))
    return ops.gaussian_blur(flat.view(n, ch, h, w), sigma)


def _motion_blur(x: torch.Tensor, c: tuple[int, float], g: torch.Generator) -> torch.Tensor:
    angles = torch.rand(x.shape[0], generator=g) * 90 - 45
    return ops.motion_blur(x, radius=c[0], sigma=c[1], angles_deg=angles)


def _zoom_blur(x: torch.Tensor, count: int, g: torch.Generator) -> torch.Tensor:
    return ops.zoom_blur(x, [1 + 0.01 * k for k in range(count)])


def _snow(x: torch.Tensor, c: tuple, g: torch.Generator) -> torch.Tensor:
    loc, scale, zoom, threshold, radius, sigma, mix = c
    flakes = loc + scale * torch.randn((x.shape[0], 1, *x.shape[-2:]), generator=g)
    flakes = ops.clipped_zoom(flakes, zoom)
    flakes = torch.where(flakes < threshold, 0.0, flakes).clamp(0, 1)
    angles = torch.rand(x.shape[0], generator=g) * 90 - 135
    flakes = ops.motion_blur(flakes, radius=radius, sigma=sigma, angles_deg=angles)
    flakes = torch.round(flakes * 255) / 255  # the reference round-trips the layer through PNG
    # Snow also whitens the scene: blend towards a brightened copy of the (gray) image.
    x = mix * x + (1 - mix) * torch.maximum(x, x * 1.5 + 0.5)
    return x + flakes + torch.rot90(flakes, 2, dims=(-2, -1))


def _frost(x: torch.Tensor, c: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    # Sheets at least twice the image side, so crops land in many places (64 for 28 px).
    size = max(64, 2 << (max(h, w) - 1).bit_length())
    sheets = ops.frost_textures(_FROST_SHEETS, size, g)
    pick = torch.randint(0, _FROST_SHEETS, (n,), generator=g)
    top = torch.randint(0, size - h + 1, (n,), generator=g)
    left = torch.randint(0, size - w + 1, (n,), generator=g)
    rows = (top[:, None] + torch.arange(h))[:, :, None]
    cols = (left[:, None] + torch.arange(w))[:, None, :]
    crops = sheets[pick[:, None, None], 0, rows, cols].unsqueeze(1)
    return c[0] * x + c[1] * crops


def _fog(x: torch.Tensor, c: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    strength, decay = c
    n, _, h, w = x.shape
    size = 1 << (max(h, w) - 1).bit_length()
    haze = ops.plasma_fractal(n, size, decay, g)[:, None, :h, :w]
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x + strength * haze) * peak / (peak + strength)


def _brightness(x: torch.Tensor, shift: float, g: torch.Generator) -> torch.Tensor:
    return x + shift


def _contrast(x: torch.Tensor, factor: float, g: torch.Generator) -> torch.Tensor:
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return (x - mean) * factor + mean


def _elastic_transform(
    x: torch.Tensor, c: tuple[float, float, float], g: torch.Generator
) -> torch.Tensor:
    n, _, h, w = x.shape
    side = min(h, w)
    alpha, smooth, jitter = (v * side for v in c)
    # Random affine: three anchor points around the centre moved by up to `jitter` pixels.
    cy, cx, half = float(h // 2), float(w // 2), float(side // 3)
    anchors = torch.tensor([[cx + half, cy + half], [cx - half, cy + half], [cx - half, cy - half]])
    moved = anchors + (torch.rand((n, 3, 2), generator=g) * 2 - 1) * jitter
    # Solve for the inverse map (moved -> anchors): it gives source coordinates directly.
    inverse = torch.linalg.solve(
        torch.cat((moved, torch.ones(n, 3, 1)), dim=2), anchors.expand(n, 3, 2)
    )
    field = torch.rand((n, 2, h, w), generator=g) * 2 - 1
    field = ops.gaussian_blur(field, smooth, truncate=3.0, mode="reflect") * alpha
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    px, py = cols + field[:, 0], rows + field[:, 1]
    src_x = (
        px * inverse[:, 0, 0, None, None]
        + py * inverse[:, 1, 0, None, None]
        + inverse[:, 2, 0, None, None]
    )
    src_y = (
        px * inverse[:, 0, 1, None, None]
        + py * inverse[:, 1, 1, None, None]
        + inverse[:, 2, 1, None, None]
    )
    return ops.warp(x, src_y, src_x)


def _pixelate(x: torch.Tensor, ratio: float, g: torch.Generator) -> torch.Tensor:
    return ops.box_pixelate(x, ratio)


def _jpeg_compression(x: torch.Tensor, quality: int, g: torch.Generator) -> torch.Tensor:
    return ops.jpeg_roundtrip(x, quality)


_FUNCTIONS: dict[str, Callable[[torch.Tensor, object, torch.Generator], torch.Tensor]] = {
    name: globals()[f"_{name}"] for name in CORRUPTIONS
}


def _check(x: torch.Tensor, name: str, severity: int) -> None:
    if name not in _FUNCTIONS:
        raise ValueError(f"unknown corruption {name!r}; expected one of: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, Integral) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an integer from 1 to 5, got {severity!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError("x must be a float tensor [N, C, H, W] with pixels in [0, 1]")
    # The blur operators are dense [H*W, H*W] matrices: fine for small images only.
    if min(x.shape[-2:]) < 8 or max(x.shape[-2:]) > 64:
        raise ValueError(f"images must be 8 to 64 pixels a side, got {tuple(x.shape[-2:])}")


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """``x`` (float ``[N, C, H, W]`` in [0, 1]) under corruption ``name`` at ``severity``
    1..5: float32, same shape, in [0, 1], rounded to 8-bit levels, the same for the same
    batch and ``seed``. Raises ValueError for an unknown name or severity."""
    _check(x, name, severity)
    if x.shape[0] == 0:
        return x.to(torch.float32).clone()
    generator = torch.Generator().manual_seed(seed)
    device = x.device
    with torch.no_grad():
        out = _FUNCTIONS[name](
            x.detach().to("cpu", torch.float32), _CONSTANTS[name][int(severity) - 1], generator
        )
        out = torch.round(out.clamp(0, 1) * 255) / 255
    return out.to(device)
