"""What sharing forward passes across sessions buys in-process: ``Engine.predict_many`` on
N sessions' requests against the same requests one by one (``Engine.run``).

    python -m ttaserve.bench.sharing [--sessions 15] [--batch 8] [--reps 7]

Each policy set gets two engines (the server's safety net, checks timed, verdicts off, as
in ``ttaserve bench perf``) fed the same stream of rounds, one request per session per
round; the blocks alternate order, the ratio is taken per pair and the median reported,
with the largest difference between the two engines' answers. glibc malloc is tuned as
the server tunes it (``ttaserve.server.memory``). No gRPC: ``ttaserve bench perf`` times
the same through a server.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from ttaserve.batching import Prediction, Request
from ttaserve.bench.perf_inproc import bench_images, bench_model, timed_safety
from ttaserve.engine import Engine
from ttaserve.server.memory import keep_freed_memory

DEFAULT_SETS = ("source", "alpha-bn", "graded-bn", "unmix-tns", "adanpc", "alpha-bn,unmix-tns,adanpc")


def measure(policies: Sequence[str], sessions: int, batch: int, reps: int, images: torch.Tensor,
            adanpc_entries: int = 60_000) -> dict[str, Any]:
    """Sequential vs shared time of one round of ``sessions`` requests, sessions' policies
    given round robin from ``policies``."""
    model = bench_model(adanpc_entries)
    alone, shared = (Engine(model, safety=timed_safety()) for _ in range(2))
    rounds = [images[(r * sessions + s) * batch % (len(images) - batch):][:batch].contiguous()
              for r in range(reps + 1) for s in range(sessions)]
    opening = [Request(x, f"s{i}", policy=policies[i % len(policies)]) for i, x in enumerate(rounds[:sessions])]
    worst = _compare([alone.run(r) for r in opening], shared.predict_many(opening))
    times: dict[str, list[float]] = {"sequential": [], "shared": []}
    for r in range(1, reps + 1):
        requests = [Request(x, f"s{i}") for i, x in enumerate(rounds[r * sessions:(r + 1) * sessions])]
        out = {}
        for name in ("sequential", "shared") if r % 2 else ("shared", "sequential"):
            start = time.perf_counter()
            out[name] = [alone.run(q) for q in requests] if name == "sequential" else shared.predict_many(requests)
            times[name].append(time.perf_counter() - start)
        worst = max(worst, _compare(out["sequential"], out["shared"]))
    ratios = [a / b for a, b in zip(times["sequential"], times["shared"])]
    return {"policies": list(policies), "sessions": sessions, "batch": batch, "reps": reps,
            "sequential_ms": 1e3 * statistics.median(times["sequential"]),
            "shared_ms": 1e3 * statistics.median(times["shared"]),
            "speedup": statistics.median(ratios), "max_abs_diff": worst}


def _compare(alone: Sequence[Any], shared: Sequence[Any]) -> float:
    worst = 0.0
    for a, b in zip(alone, shared):
        if not isinstance(b, Prediction):
            raise RuntimeError(f"a shared request failed: {b!r}")
        worst = max(worst, float((a.logits - b.logits).abs().max()))
    return worst


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ttaserve.bench.sharing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=15, help="sessions per round (default 15)")
    parser.add_argument("--batch", type=int, default=8, help="images per request (default 8)")
    parser.add_argument("--reps", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS),
                        help="policy sets; a comma list is given to the sessions round robin")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    images, source = bench_images(None, 4096)
    print(f"{args.sessions} sessions x batch {args.batch}, {args.reps} rounds, torch threads {args.threads}, "
          f"images: {source}\n")
    print("| sessions' policies | one by one (ms/round) | shared (ms/round) | speedup | max abs diff |")
    print("|---|---:|---:|---:|---:|")
    for spec in args.sets:
        r = measure(spec.split(","), args.sessions, args.batch, args.reps, images)
        print(f"| {spec} | {r['sequential_ms']:.1f} | {r['shared_ms']:.1f} | {r['speedup']:.2f}× | "
              f"{r['max_abs_diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
