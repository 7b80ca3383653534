"""GPU benchmark of the Triton kernels (needs CUDA and triton; nothing imports this module).

    python -m ttaserve.bench.kernels_gpu [--batch 256] [--json out.json]

For each kernel: median time of the Triton and torch implementations and the Triton
kernel's *achieved bandwidth* — the bytes the operation must move at least, divided by its
time — next to the bandwidth of a plain device copy (``torch.clone``: read + write), the
practical ceiling. For alpha-bn the least is 3|z| (two reads, one write: statistics need a
full pass before any output can be written). The kNN search is compute-bound
(2·B·N·d flops), so its GFLOP/s are reported too.

Then the end-to-end cost of alpha-bn on a ResNet-50-shaped network (bottleneck stages
3-4-6-3, widths 256-2048, 224x224, random weights; no torchvision) at batch 256: forward
time with source BatchNorm, with alpha-bn on the torch reference and on the Triton kernel.
Prints a table, and JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ttaserve.adapters import TensorState, create_adapter, prepare
from ttaserve.kernels import reference
from ttaserve.kernels.select import ENV_VAR

GB = 1e9


def timed_ms(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn`` on the current CUDA stream, in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def copy_bandwidth(numel: int = 1 << 28) -> float:
    """GB/s of ``clone`` (one read and one write of a 1 GiB fp32 tensor)."""
    x = torch.empty(numel, device="cuda")
    return 2 * x.numel() * 4 / (timed_ms(x.clone) / 1e3) / GB


def _row(name: str, bytes_moved: float, t_triton: float, t_torch: float, **extra: float) -> dict[str, Any]:
    return {"kernel": name, "triton_ms": t_triton, "torch_ms": t_torch,
            "triton_GBps": bytes_moved / (t_triton / 1e3) / GB, "speedup": t_torch / t_triton, **extra}


def bench_alpha_bn(tk: Any, batch: int) -> list[dict[str, Any]]:
    rows = []
    for channels, side in [(64, 112), (256, 56), (512, 28), (2048, 7)]:
        z = torch.randn(batch, channels, side, side, device="cuda")
        stats = [torch.randn(channels, device="cuda"), torch.rand(channels, device="cuda") + 0.5,
                 torch.rand(channels, device="cuda"), torch.randn(channels, device="cuda")]
        for offsets in (None, [0, batch // 4, batch // 2, batch]):
            args = (z, offsets, stats[0], stats[1], 0.1, stats[2], stats[3], 1e-5)
            name = f"alpha_bn {tuple(z.shape)} segments={1 if offsets is None else len(offsets) - 1}"
            rows.append(_row(name, 3 * z.numel() * 4, timed_ms(partial(tk.alpha_bn, *args)),
                             timed_ms(partial(reference.alpha_bn, *args))))
    return rows


def bench_unmix(tk: Any, batch: int) -> list[dict[str, Any]]:
    rows = []
    for k, channels in [(16, 256), (16, 2048), (128, 2048)]:
        args = (torch.randn(batch, channels, device="cuda"), torch.rand(batch, channels, device="cuda"),
                torch.randn(k, channels, device="cuda"), torch.rand(k, channels, device="cuda"), 0.07)
        moved = (4 * batch * channels + 2 * k * channels + batch * k) * 4
        rows.append(_row(f"unmix_moments B={batch} K={k} C={channels}", moved,
                         timed_ms(partial(tk.unmix_moments, *args)),
                         timed_ms(partial(reference.unmix_moments, *args))))
    return rows


def bench_knn(tk: Any, batch: int) -> list[dict[str, Any]]:
    rows = []
    for count, dim, k in [(60_000, 512, 100), (60_000, 2048, 100), (10_000, 512, 10)]:
        query = F.normalize(torch.randn(batch, dim, device="cuda"), dim=1)
        keys = F.normalize(torch.randn(count, dim, device="cuda"), dim=1)
        t_triton = timed_ms(partial(tk.knn_topk, query, keys, k))
        t_torch = timed_ms(partial(reference.knn_topk, query, keys, k))
        gflops = 2 * batch * count * dim / (t_triton / 1e3) / GB
        rows.append(_row(f"knn_topk B={batch} N={count} d={dim} k={k}", (count + batch) * dim * 4,
                         t_triton, t_torch, triton_GFLOPs=gflops))
    return rows


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def resnet50_like(num_classes: int = 1000) -> nn.Module:
    """ResNet-50's layer shapes (53 BatchNorm2d layers), random weights."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                               nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for i in range(blocks):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = 4 * width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


@contextmanager
def kernels(choice: str) -> Iterator[None]:
    previous = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = choice
    try:
        yield
    finally:
        if previous is None:
            del os.environ[ENV_VAR]
        else:
            os.environ[ENV_VAR] = previous


def bench_model(batch: int, image: int) -> dict[str, float]:
    model = prepare(resnet50_like().cuda())
    x = torch.randn(batch, 3, image, image, device="cuda")
    source, alpha_bn = create_adapter("source", model), create_adapter("alpha-bn", model)
    out: dict[str, float] = {}
    with torch.no_grad():
        out["source_ms"] = timed_ms(lambda: source.forward(model, x, TensorState()), repeats=10)
    for choice in ("torch", "triton"):
        with kernels(choice):
            out[f"alpha_bn_{choice}_ms"] = timed_ms(lambda: alpha_bn.forward(model, x, TensorState()), repeats=10)
    for choice in ("torch", "triton"):
        out[f"alpha_bn_{choice}_overhead_pct"] = 100 * (out[f"alpha_bn_{choice}_ms"] / out["source_ms"] - 1)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernels_gpu needs a CUDA device")
    from ttaserve.kernels import triton_kernels as tk

    if not tk.AVAILABLE:
        raise SystemExit("kernels_gpu needs the 'triton' package")
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "copy_GBps": copy_bandwidth()}
    result["kernels"] = bench_alpha_bn(tk, args.batch) + bench_unmix(tk, args.batch) + bench_knn(tk, args.batch)
    result["resnet50_like"] = bench_model(args.batch, args.image)
    _print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _print_table(result: dict[str, Any]) -> None:
    print(f"{result['device']}: device copy {result['copy_GBps']:.0f} GB/s")
    print(f"{'kernel':58s} {'triton ms':>10s} {'torch ms':>10s} {'GB/s':>8s} {'% copy':>7s}")
    for row in result["kernels"]:
        share = 100 * row["triton_GBps"] / result["copy_GBps"]
        print(f"{row['kernel']:58s} {row['triton_ms']:10.3f} {row['torch_ms']:10.3f} "
              f"{row['triton_GBps']:8.0f} {share:6.0f}%")
    print(json.dumps(result["resnet50_like"], indent=2))


if __name__ == "__main__":
    main()
