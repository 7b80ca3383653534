"""Normalization and voting primitives. Torch references here; fused versions are picked
by :mod:`ttaserve.kernels.select` when a device supports them."""

from ttaserve.kernels.norm import (
    batch_moments,
    instance_moments,
    normalize,
    segment_moments,
)

__all__ = ["batch_moments", "instance_moments", "normalize", "segment_moments"]
