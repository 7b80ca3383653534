"""ONNX Runtime against torch on the same model and batches (``ttaserve bench perf``).

The demo model is exported with ``ttaserve export-onnx``'s code and served by ONNX Runtime
(CPU provider, the benchmark's thread count, one intra-op thread by default), with the
same 60k-entry AdaNPC memory as the torch model. Two measurements per batch size, both
paired and interleaved like the torch overheads (:mod:`ttaserve.bench.perf_inproc`):

* **ORT vs torch**: each policy's time per batch on ONNX Runtime / on torch, both paths
  (bare ``adapter.forward`` and ``Engine.predict``); the ``source`` row is the plain
  forward pass, the number that decides which backend is faster for a model that is not
  adapted at all;
* **ORT overheads**: each policy's time on ONNX Runtime / the source policy's on ONNX
  Runtime, as the torch table has it.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ttaserve.adapters import PreparedModel
from ttaserve.bench.perf_inproc import (
    Subject,
    _block,
    _policy_result,
    _warm,
    measure_overhead,
    split,
)

__all__ = ["ONNX_POLICIES", "measure_onnx", "onnx_policies"]

ONNX_POLICIES = ("source", "alpha-bn", "tbn", "unmix-tns", "adanpc")
Progress = Callable[[int, str], None]


def onnx_policies(policies: tuple[str, ...]) -> list[str]:
    return [p for p in ONNX_POLICIES if p in policies or p == "source"]


def _onnx_model(torch_model: PreparedModel, threads: int, workdir: Path) -> Any:
    from ttaserve.handlers.loader import demo_model
    from ttaserve.handlers.onnx_export import export_onnx
    from ttaserve.handlers.onnx_model import OnnxModel, load_onnx
    from ttaserve.models import demo

    path = workdir / "demo.onnx"
    export_onnx(demo(), demo_model().spec, path)
    model: OnnxModel = load_onnx(path, threads=threads)
    model.artifacts["adanpc.memory"] = torch_model.artifact("adanpc.memory")
    return model


def measure_onnx(torch_model: PreparedModel, images: torch.Tensor, batch_sizes: tuple[int, ...],
                 policies: tuple[str, ...], reps: int, block_s: float, seed: int, threads: int,
                 progress: Progress) -> dict[str, Any]:
    """The ONNX Runtime part of a perf run (JSON-able)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return {"status": "unavailable", "reason": f"onnxruntime: {exc} (pip install 'ttaserve[onnx]')"}
    names = onnx_policies(policies)
    with tempfile.TemporaryDirectory(prefix="ttaserve-perf-onnx-") as tmp:
        model = _onnx_model(torch_model, threads, Path(tmp))
        result: dict[str, Any] = {"status": "ok", "onnxruntime": ort.__version__, "providers": model.providers,
                                  "threads": model.threads, "policies": names, "vs_torch": {}, "overhead": {}}
        for batch in sorted(batch_sizes):
            batches = split(images, batch, 4)
            ours = {p: Subject.of(model, p) for p in names}
            theirs = {p: Subject.of(torch_model, p) for p in names}
            result["vs_torch"][str(batch)] = _versus(theirs, ours, batches, reps, block_s, seed, progress)
            ours = {p: Subject.of(model, p) for p in names}  # fresh sessions for the overheads
            result["overhead"][str(batch)] = measure_overhead(ours, batches, reps, block_s, seed, progress)
    return result


def _versus(theirs: dict[str, Subject], ours: dict[str, Subject], batches: list[torch.Tensor], reps: int,
            target_s: float, seed: int, progress: Progress) -> dict[str, Any]:
    """Per policy: median over repetitions of ORT time / torch time for a block of the same
    batches, run back to back (order alternating), on both paths."""
    _warm(theirs, batches)
    _warm(ours, batches)
    per_batch = _block(theirs["source"].call("raw"), batches, 3)
    inner = max(1, round(target_s / max(per_batch, 1e-6)))
    samples: dict[str, dict[str, list[float]]] = {p: {} for p in ours}
    order = list(ours)
    rng = random.Random(seed)
    for rep in range(reps):
        rng.shuffle(order)
        for policy in order:
            for key, value in _pair(theirs[policy], ours[policy], batches, inner, rep % 2 == 1).items():
                samples[policy].setdefault(key, []).append(value)
            progress(1, f"onnx vs torch b{batches[0].shape[0]}")
    return {"inner": inner, "policies": {p: _renamed(_policy_result(s)) for p, s in samples.items()}}


def _pair(torch_subject: Subject, ort_subject: Subject, batches: list[torch.Tensor], inner: int,
          ort_first: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    for mode in ("engine", "raw"):
        runs = [("ort", ort_subject), ("torch", torch_subject)]
        timed = {name: _block(s.call(mode), batches, inner) for name, s in (runs if ort_first else runs[::-1])}
        # _policy_result's keys: "<mode>_s" is the measured one (ORT), "source_<mode>_s" the reference (torch)
        out[f"{mode}_s"], out[f"source_{mode}_s"] = timed["ort"], timed["torch"]
        out[mode] = timed["ort"] / timed["torch"]
    out["engine_vs_forward"] = out["engine_s"] / out["raw_s"]
    out["source_engine_vs_forward"] = out["source_engine_s"] / out["source_raw_s"]
    return out


def _renamed(row: dict[str, Any]) -> dict[str, Any]:
    """ORT / torch ratios and both backends' milliseconds, named for what they are."""
    return {"raw": row["raw"], "engine": row["engine"], "ort_raw_ms": row["raw_ms"],
            "torch_raw_ms": row["source_raw_ms"], "ort_engine_ms": row["engine_ms"],
            "torch_engine_ms": row["source_engine_ms"]}
