"""One GPU check, under five minutes (``scripts/gpu-check.sh``; nothing else imports this).

On a machine with a CUDA GPU and torch, triton, onnxruntime(-gpu) installed (no network
needed), it prints four tables:

1. **kernels**: each Triton kernel against its torch reference on random inputs (max |diff|);
2. **kernel timings**: Triton vs torch, median ms per call (wall clock between device synchronizations);
3. **engine stream**: every registered policy through ``Engine`` on the GPU against the same
   stream on the CPU: max |logit diff| and whether every prediction agrees;
4. **ONNX Runtime**: the demo model and a ResNet-50-shaped model exported with ttaserve's
   exporter, ORT's CUDA provider against torch on CUDA: agreement and source-forward ms.

``--cpu`` is a dry run of the same code paths on the CPU (Triton's interpreter, small
shapes, CPU provider) for machines without a GPU; its numbers say nothing about a GPU.
Every section catches its own failure and prints it, so one broken part does not hide the
others; ``--json FILE`` writes everything. A section is skipped, and says so, when the time
budget (``--budget``, 270 s) is spent.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

Row = dict[str, Any]


class Clock:
    def __init__(self, budget_s: float) -> None:
        self.deadline = time.monotonic() + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()


def timed_ms(fn: Callable[[], Any], device: torch.device, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn`` in ms, synchronizing the device around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


# -- 1 and 2: kernels ------------------------------------------------------------------------
def kernel_cases(device: torch.device, small: bool) -> list[tuple[str, str, tuple[Any, ...]]]:
    """(kernel, label, args) on ``device``; small shapes for the interpreter."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    def pos(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=g) + 0.5).to(device)

    b, c, side = (4, 8, 6) if small else (256, 256, 28)
    z = rnd(b, c, side, side)
    stats = (rnd(c), pos(c), pos(c), rnd(c))
    k, n, d = (4, 50, 16) if small else (128, 60_000, 512)
    query, keys = F.normalize(rnd(b, d), dim=1), F.normalize(rnd(n, d), dim=1)
    labels = torch.randint(0, 10, (n,), generator=g).to(device)
    return [
        ("alpha_bn", f"z {tuple(z.shape)}", (z, None, *stats[:2], 0.1, *stats[2:], 1e-5)),
        ("alpha_bn", f"z {tuple(z.shape)}, 3 segments", (z, [0, 1, b // 2, b], *stats[:2], 0.1, *stats[2:], 1e-5)),
        ("unmix_moments", f"B={b} K={k} C={c}", (rnd(b, c), pos(b, c), rnd(k, c), pos(k, c), 0.07)),
        ("knn_topk", f"B={b} N={n} d={d} k=10", (query, keys, 10)),
        ("knn_vote", f"B={b} N={n} d={d} k=10", (query, keys, labels, 10, 0.1, 10)),
    ]


def _max_diff(a: Any, b: Any) -> float:
    if isinstance(a, tuple):
        return max(_max_diff(x, y) for x, y in zip(a, b) if x.is_floating_point())
    return float((a.float() - b.float()).abs().max())


def check_kernels(device: torch.device, small: bool, timings: bool) -> tuple[list[Row], list[Row]]:
    from ttaserve.kernels import reference
    from ttaserve.kernels import triton_kernels as tk

    if not tk.AVAILABLE:
        raise RuntimeError("the triton package cannot be imported")
    agreement, timing = [], []
    for name, label, args in kernel_cases(device, small):
        ours, ref = getattr(tk, name), getattr(reference, name)
        diff = _max_diff(ours(*args), ref(*args))
        agreement.append({"kernel": name, "case": label, "max_abs_diff": diff, "ok": diff <= 1e-4})
        if timings:
            t_triton, t_torch = timed_ms(partial(ours, *args), device), timed_ms(partial(ref, *args), device)
            timing.append({"kernel": name, "case": label, "triton_ms": t_triton, "torch_ms": t_torch,
                           "speedup": t_torch / t_triton})
    return agreement, timing


# -- 3: every policy on the device vs the CPU ------------------------------------------------
def policy_stream(device: torch.device, batches: int, batch: int) -> list[Row]:
    from ttaserve import Engine
    from ttaserve.adapters import policy_names
    from ttaserve.models import demo

    g = torch.Generator().manual_seed(0)
    stream = [(0.5 + 0.3 * (torch.rand(batch, 1, 28, 28, generator=g) - 0.5)
               + 0.2 * torch.randn(batch, 1, 28, 28, generator=g)).clamp(0, 1) for _ in range(batches)]
    rows = []
    for policy in policy_names():
        try:
            on_cpu, on_device = Engine(demo(), policy), Engine(demo().to(device), policy)
            diff, agree = 0.0, True
            for x in stream:
                a = on_cpu.predict(x, session="s")
                b = on_device.predict(x.to(device), session="s").cpu()
                diff, agree = max(diff, float((a - b).abs().max())), agree and bool(torch.equal(a.argmax(1), b.argmax(1)))
            rows.append({"policy": policy, "max_abs_diff": diff, "same_predictions": agree})
        except Exception as exc:  # noqa: BLE001 - reported in the table
            rows.append({"policy": policy, "error": f"{type(exc).__name__}: {exc}"[:160]})
    return rows


# -- 4: ONNX Runtime vs torch on the device --------------------------------------------------
def onnx_vs_torch(device: torch.device, small: bool, workdir: Path) -> list[Row]:
    from ttaserve.bench.kernels_gpu import resnet50_like
    from ttaserve.handlers.loader import demo_model
    from ttaserve.handlers.spec import ModelSpec, TensorSpec
    from ttaserve.models import demo

    cases: list[tuple[str, Any, ModelSpec, list[int]]] = [
        ("demo", demo(), demo_model().spec, [1, 16, 64] if not small else [1, 8])]
    if not small:
        torch.manual_seed(0)
        spec = ModelSpec("r50", (TensorSpec("input", "FP32", (-1, 3, 224, 224)),),
                         (TensorSpec("logits", "FP32", (-1, 1000)),))
        cases.append(("resnet50-like 224px", resnet50_like().eval(), spec, [1, 32]))
    rows = []
    for label, module, spec, sizes in cases:
        rows += _onnx_case(label, module, spec, sizes, device, workdir)
    return rows


def _onnx_case(label: str, module: Any, spec: Any, sizes: list[int], device: torch.device,
               workdir: Path) -> list[Row]:
    from ttaserve.adapters import normalizer, prepare
    from ttaserve.adapters.alpha_bn import alpha_bn_norm
    from ttaserve.handlers.onnx_export import export_onnx
    from ttaserve.handlers.onnx_model import load_onnx

    path = workdir / f"{label.split()[0]}.onnx"
    export_onnx(module, spec, path)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else None
    ort_model = load_onnx(path, providers=providers)
    torch_model = prepare(module.to(device))
    rows = []
    for batch in sizes:
        x = torch.rand(batch, *spec.inputs[0].shape[1:], generator=torch.Generator().manual_seed(batch))
        xd = x.to(device)
        with torch.no_grad():
            diffs = {}
            for name, hook in (("source", None), ("tbn", alpha_bn_norm(0.0))):
                with normalizer(hook):
                    diffs[name] = float((ort_model(x) - torch_model(xd).cpu()).abs().max())
            ort_ms = timed_ms(partial(ort_model, x), device, repeats=10)
            torch_ms = timed_ms(partial(torch_model, xd), device, repeats=10)
        rows.append({"model": label, "batch": batch, "providers": ort_model.providers[0],
                     "source_diff": diffs["source"], "tbn_diff": diffs["tbn"], "ort_ms": ort_ms,
                     "torch_ms": torch_ms, "ort_vs_torch": ort_ms / torch_ms})
    return rows


# -- driver ----------------------------------------------------------------------------------
def run(cpu: bool, budget_s: float) -> dict[str, Any]:
    device = torch.device("cpu" if cpu else "cuda")
    clock = Clock(budget_s)
    result: dict[str, Any] = {"device": "cpu (dry run)" if cpu else torch.cuda.get_device_name(),
                              "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    sections: list[tuple[str, Callable[[], Any], float]] = [
        ("kernels", lambda: check_kernels(device, small=cpu, timings=not cpu), 30.0),
        ("policies", lambda: policy_stream(device, batches=2 if cpu else 4, batch=8 if cpu else 64), 30.0),
        ("onnx", lambda: _with_tmp(lambda tmp: onnx_vs_torch(device, cpu, tmp)), 60.0),
    ]
    for name, section, needs_s in sections:
        if clock.left() < needs_s:
            result[name] = {"skipped": f"time budget spent ({clock.left():.0f} s left)"}
            continue
        started = time.monotonic()
        try:
            result[name] = section()
        except Exception as exc:  # noqa: BLE001 - printed, the other sections still run
            result[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=3)}
        result[f"{name}_s"] = round(time.monotonic() - started, 1)
    if isinstance(result.get("kernels"), tuple):
        result["kernels"], result["kernel_timings"] = result["kernels"]
    return result


def _with_tmp(fn: Callable[[Path], Any]) -> Any:
    with tempfile.TemporaryDirectory(prefix="ttaserve-gpu-check-") as tmp:
        return fn(Path(tmp))


def _table(rows: Any, columns: list[str]) -> list[str]:
    if not isinstance(rows, list):
        return [f"  {json.dumps(rows)[:400]}"]
    if not rows:
        return ["  (nothing measured)"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    return lines


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def report(result: dict[str, Any]) -> str:
    lines = [f"ttaserve GPU check on {result['device']} (torch {result['torch']}, {result['started']})", ""]
    parts = [("1. Triton kernels vs torch references", "kernels", ["kernel", "case", "max_abs_diff", "ok"]),
             ("2. kernel timings (ms)", "kernel_timings", ["kernel", "case", "triton_ms", "torch_ms", "speedup"]),
             ("3. engine stream, device vs CPU", "policies", ["policy", "max_abs_diff", "same_predictions", "error"]),
             ("4. ONNX Runtime vs torch", "onnx", ["model", "batch", "providers", "source_diff", "tbn_diff",
                                                    "ort_ms", "torch_ms", "ort_vs_torch"])]
    for title, key, columns in parts:
        lines += [f"## {title}" + (f" ({result[key + '_s']} s)" if key + "_s" in result else ""), ""]
        lines += _table(result.get(key, {"skipped": "not run (CPU dry run)" if key == "kernel_timings" else "not run"}),
                        columns) + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU (no GPU numbers)")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds for all sections (default 270)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch; use --cpu for a dry run")
    if args.cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    torch.manual_seed(0)
    result = run(args.cpu, args.budget)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
