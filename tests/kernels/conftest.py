"""The Triton kernels run compiled on CUDA when a GPU is present, otherwise under Triton's
CPU interpreter. Triton fixes that choice when it (and each kernel) is first imported, so
without a GPU TRITON_INTERPRET=1 is set here, before anything in the test run imports it."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch

import ttaserve.kernels

MODULE = "ttaserve.kernels.triton_kernels"

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@dataclass(frozen=True)
class TritonKernels:
    module: ModuleType  # ttaserve.kernels.triton_kernels, compiled or interpreted
    device: torch.device  # where its inputs must live


@pytest.fixture(scope="module")
def triton_kernels() -> Iterator[TritonKernels]:
    try:
        import triton
        import triton.language as tl
    except ImportError as exc:
        pytest.skip(f"triton is not installed ({exc}); it is an optional dependency")
    if not hasattr(tl, "topk"):
        pytest.skip(f"triton {triton.__version__} has no tl.topk (triton >= 3.2), used by the kNN kernel")
    if torch.cuda.is_available():
        yield TritonKernels(importlib.import_module(MODULE), torch.device("cuda"))
        return
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older ones read the variable directly
    if not (knobs.runtime.interpret if knobs else os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("no GPU, and triton was imported before TRITON_INTERPRET=1 could be set")
    # Import our module afresh so its kernels are interpreted too; put back what was there.
    previous = sys.modules.pop(MODULE, None)
    try:
        yield TritonKernels(importlib.import_module(MODULE), torch.device("cpu"))
    finally:
        sys.modules.pop(MODULE, None)
        vars(ttaserve.kernels).pop("triton_kernels", None)
        if previous is not None:
            sys.modules[MODULE] = previous
            ttaserve.kernels.triton_kernels = previous  # type: ignore[attr-defined]
