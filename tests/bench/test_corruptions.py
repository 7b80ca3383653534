"""Fashion-MNIST-C corruptions: contract, determinism, severity ladder, effect on the demo model."""

from __future__ import annotations

import pytest
import torch

from ttaserve.bench import image_ops as ops
from ttaserve.bench.corruptions import CORRUPTIONS, corrupt
from ttaserve.data import load_split

# Corruptions that draw no random numbers: the seed must not matter for them.
DETERMINISTIC = {
    "defocus_blur",
    "zoom_blur",
    "brightness",
    "contrast",
    "pixelate",
    "jpeg_compression",
}


@pytest.fixture(scope="module")
def test_set() -> tuple[torch.Tensor, torch.Tensor]:
    return load_split("test")


@pytest.fixture(scope="module")
def clean(test_set: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """200 real test images: enough for stable averages, fast for every corruption."""
    return test_set[0][:200]


def test_names_are_the_fifteen_standard_ones_in_order() -> None:
    assert CORRUPTIONS[:3] == ("gaussian_noise", "shot_noise", "impulse_noise")
    assert CORRUPTIONS[-1] == "jpeg_compression"
    assert len(CORRUPTIONS) == len(set(CORRUPTIONS)) == 15


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shape_dtype_range_and_8bit_levels(clean: torch.Tensor, name: str) -> None:
    for severity in (1, 5):
        out = corrupt(clean[:32].double(), name, severity)
        assert out.shape == (32, 1, 28, 28) and out.dtype == torch.float32
        assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()
        assert torch.equal(torch.round(out * 255) / 255, out)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_same_seed_same_images_other_seed_differs_if_random(clean: torch.Tensor, name: str) -> None:
    batch = clean[:32]
    first = corrupt(batch, name, 3, seed=7)
    assert torch.equal(first, corrupt(batch.clone(), name, 3, seed=7))
    other = corrupt(batch, name, 3, seed=8)
    assert torch.equal(first, other) == (name in DETERMINISTIC)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_change_grows_with_severity_and_is_large_at_five(clean: torch.Tensor, name: str) -> None:
    change = [(corrupt(clean, name, s) - clean).abs().mean().item() for s in range(1, 6)]
    assert all(b >= a for a, b in zip(change, change[1:], strict=False)), change
    assert change[4] > change[0]
    # Substantial: on average every pixel moves by at least 5 of the 255 gray levels.
    assert change[4] > 5 / 255, change


def _error(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) != y).float().mean().item()


@pytest.fixture(scope="module")
def demo_clean_error(
    demo_module: torch.nn.Module, test_set: tuple[torch.Tensor, torch.Tensor]
) -> float:
    return _error(demo_module, test_set[0][:1000], test_set[1][:1000])


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_five_raises_the_demo_models_error(
    demo_module: torch.nn.Module,
    test_set: tuple[torch.Tensor, torch.Tensor],
    demo_clean_error: float,
    name: str,
) -> None:
    x, y = test_set[0][:1000], test_set[1][:1000]
    shifted_error = _error(demo_module, corrupt(x, name, 5), y)
    assert shifted_error > demo_clean_error + 0.02, (demo_clean_error, shifted_error)


def test_other_sizes_and_channel_counts_are_kept() -> None:
    x = torch.rand(4, 3, 32, 30, generator=torch.Generator().manual_seed(0))
    for name in CORRUPTIONS:
        out = corrupt(x, name, 2)
        assert out.shape == x.shape and out.device == x.device


def test_empty_batch_gives_empty_result() -> None:
    assert corrupt(torch.zeros(0, 1, 28, 28), "fog", 5).shape == (0, 1, 28, 28)


@pytest.mark.parametrize(
    ("name", "severity", "message"),
    [
        ("gaussian", 1, "unknown corruption"),
        ("speckle_noise", 1, "unknown corruption"),
        ("fog", 0, "severity"),
        ("fog", 6, "severity"),
        ("fog", 2.0, "severity"),
        ("fog", True, "severity"),
    ],
)
def test_unknown_names_and_severities_are_rejected(
    name: str, severity: object, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        corrupt(torch.zeros(1, 1, 28, 28), name, severity)  # type: ignore[arg-type]


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="float tensor"):
        corrupt(torch.zeros(1, 28, 28), "fog", 1)
    with pytest.raises(ValueError, match="float tensor"):
        corrupt(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), "fog", 1)


def test_jpeg_at_quality_100_keeps_smooth_images() -> None:
    ramp = torch.linspace(0, 1, 28).view(1, 1, 1, 28).expand(2, 1, 28, 28)
    assert (ops.jpeg_roundtrip(ramp, 100) - ramp).abs().max() <= 2 / 255


def test_pixelate_averages_blocks_and_keeps_constant_images() -> None:
    flat = torch.full((1, 1, 28, 28), 0.3)
    assert torch.allclose(ops.box_pixelate(flat, 0.5), flat)
    x = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out = ops.box_pixelate(x, 0.5)
    assert torch.allclose(out[0, 0, :2, :2], x[0, 0, :2, :2].mean().expand(2, 2))


def test_motion_blur_streaks_one_way_along_the_angle() -> None:
    dot = torch.zeros(2, 1, 15, 15)
    dot[:, :, 7, 7] = 1
    out = ops.motion_blur(dot, radius=3, sigma=2.0, angles_deg=torch.tensor([0.0, 90.0]))
    assert torch.isclose(out.sum(), torch.tensor(2.0))
    assert out[0, 0, 7, 8:].sum() > 0.5 and out[0, 0, 7, :7].sum() == 0  # along +x only
    assert out[1, 0, 8:, 7].sum() > 0.5 and out[1, 0, :7, 7].sum() == 0  # along +y only


def test_gaussian_blur_preserves_mean_of_constant_and_smooths_noise() -> None:
    flat = torch.full((1, 1, 28, 28), 0.7)
    assert torch.allclose(ops.gaussian_blur(flat, 1.5), flat)
    noise = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert ops.gaussian_blur(noise, 1.5).std() < 0.5 * noise.std()


def test_plasma_maps_span_zero_to_one_and_frost_sheets_look_like_frost() -> None:
    maps = ops.plasma_fractal(3, 32, 2.0, torch.Generator().manual_seed(0))
    assert maps.shape == (3, 32, 32)
    assert torch.allclose(maps.amin(dim=(1, 2)), torch.zeros(3))
    assert torch.allclose(maps.amax(dim=(1, 2)), torch.ones(3))
    sheets = ops.frost_textures(6, 64, torch.Generator().manual_seed(0))
    level = sheets.mean(dim=(1, 2, 3))
    assert ((level > 0.25) & (level < 0.9)).all()
    assert sheets.std(dim=(2, 3)).mean() > 0.03
