"""The one switch between the torch references and the fused Triton kernels.

``implementation(name)`` returns a callable with the reference's signature that picks, per
call, from the device of its first tensor argument:

* ``triton`` when the tensors are on CUDA, triton is importable and no gradient is needed;
* ``torch`` (:mod:`ttaserve.kernels.reference`) otherwise — always on CPU, so CPU results
  are the reference's bit for bit.

The environment variable ``TTASERVE_KERNELS`` overrides the choice: ``torch`` forces the
references, ``triton`` the Triton kernels (an error when triton cannot be imported; on CPU
they then need ``TRITON_INTERPRET=1``, Triton's interpreter), ``auto`` or unset is the rule
above. The Triton kernels have no backward, so a call that needs gradients always runs the
reference. The check costs one dictionary lookup and a device test per call.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from typing import Any

import torch

from ttaserve.kernels import reference

__all__ = ["ENV_VAR", "NAMES", "choose", "implementation", "triton_available"]

ENV_VAR = "TTASERVE_KERNELS"
NAMES = ("alpha_bn", "unmix_moments", "knn_topk", "knn_vote")
_CHOICES = ("auto", "torch", "triton")
_TRITON_MODULE = "ttaserve.kernels.triton_kernels"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether the Triton kernels can run here (the ``triton`` package imports)."""
    return bool(importlib.import_module(_TRITON_MODULE).AVAILABLE)


def choose(device: torch.device, needs_grad: bool, forced: str | None, triton_ok: bool) -> str:
    """``"torch"`` or ``"triton"`` for one call; ``forced`` is the TTASERVE_KERNELS value."""
    forced = (forced or "auto").strip().lower()
    if forced not in _CHOICES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(_CHOICES)}, got {forced!r}")
    if forced == "torch" or needs_grad:
        return "torch"
    if forced == "triton":
        if not triton_ok:
            raise RuntimeError(f"{ENV_VAR}=triton but the 'triton' package cannot be imported")
        return "triton"
    return "triton" if device.type == "cuda" and triton_ok else "torch"


@functools.cache
def implementation(name: str) -> Callable[..., Any]:
    """The kernel ``name`` (one of :data:`NAMES`), dispatching per call as described above."""
    if name not in NAMES:
        raise KeyError(f"unknown kernel {name!r}; known: {', '.join(NAMES)}")
    torch_fn = getattr(reference, name)

    @functools.wraps(torch_fn)
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        forced = os.environ.get(ENV_VAR)
        # triton_available() imports triton; skip that on the common CPU path.
        gpu_or_forced = tensors[0].is_cuda or (forced or "").strip().lower() == "triton"
        which = choose(tensors[0].device, needs_grad, forced, gpu_or_forced and triton_available())
        if which == "torch":
            return torch_fn(*args, **kwargs)
        # Looked up per call so a test can swap in a copy built under Triton's interpreter.
        return getattr(importlib.import_module(_TRITON_MODULE), name)(*args, **kwargs)

    return dispatch
