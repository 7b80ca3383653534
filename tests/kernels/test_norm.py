from __future__ import annotations

import torch

from ttaserve.kernels import batch_moments, instance_moments, normalize, segment_moments


def test_segment_moments_equal_each_segment_alone() -> None:
    z = torch.randn(10, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    offsets = [0, 3, 4, 10]
    mean, var = segment_moments(z, offsets)
    for start, stop in zip(offsets[:-1], offsets[1:]):
        m, v = batch_moments(z[start:stop])
        assert torch.equal(mean[start:stop], m.expand(stop - start, -1))
        assert torch.equal(var[start:stop], v.expand(stop - start, -1))


def test_moments_are_biased() -> None:
    z = torch.randn(5, 3, 4, 4)
    _, var = batch_moments(z)
    torch.testing.assert_close(var, z.transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=False))
    m, v = instance_moments(z)
    assert m.shape == v.shape == (5, 3)


def test_per_sample_normalize_matches_per_channel_when_equal() -> None:
    z = torch.randn(4, 3, 5, 5)
    mean, var = torch.randn(3), torch.rand(3) + 0.5
    w, b = torch.rand(3), torch.randn(3)
    per_channel = normalize(z, mean, var, w, b, 1e-5)
    per_sample = normalize(z, mean.expand(4, 3), var.expand(4, 3), w.expand(4, 3), b.expand(4, 3), 1e-5)
    torch.testing.assert_close(per_sample, per_channel, rtol=1e-5, atol=1e-6)
