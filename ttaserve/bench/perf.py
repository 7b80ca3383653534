"""``ttaserve bench perf``: what adaptation costs (docs/BENCHMARKS.md, "Performance").

1. In-process overhead of every policy against the source forward on the same batches, at
   batch 1, 16 and 64, through the engine and through the bare adapter
   (:mod:`ttaserve.bench.perf_inproc`).
2. gRPC with tritonclient against in-process, batch 64, source policy.
3. 32 concurrent sequences sending batch-8 requests: dynamic batching, concurrency without
   batching, and one request at a time (:mod:`ttaserve.bench.perf_grpc`).
4. Peer servers on the same model (``--peers``; :mod:`ttaserve.bench.peers`, own virtualenv).
5. Bytes of state per session and peak memory of one step, per policy.
6. ONNX Runtime against torch on the same model and batches, and the policies' overheads
   on ONNX Runtime (:mod:`ttaserve.bench.perf_onnx`; ``--no-onnx`` skips it).

Every number that is compared is a ratio measured in this run, between neighbouring
measurements, and the median over repetitions (the machines are shared and noisy). The
result records the load average and the torch thread count next to the numbers.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ttaserve.bench.perf_inproc import (
    POLICIES,
    Subject,
    bench_images,
    bench_model,
    measure_memory,
    measure_overhead,
    split,
)
from ttaserve.bench.perf_report import check_goals

__all__ = ["Config", "POLICIES", "quick_config", "run", "total_steps"]

Progress = Callable[[int, str], None]


@dataclass(frozen=True)
class Config:
    batch_sizes: tuple[int, ...] = (1, 16, 64)
    policies: tuple[str, ...] = POLICIES
    reps: int = 9  # paired repetitions per policy and batch size
    block_s: float = 0.05  # a source block runs about this long; the policy's block as many batches
    threads: int = 1  # torch intra-op threads (0: torch's default); the servers get the same
    adanpc_entries: int = 60_000  # AdaNPC source memory size (docs/BENCHMARKS.md states the goal for 60k)
    data: str | None = None
    seed: int = 0
    server: bool = True  # parts 2 and 3 (start ttaserve subprocesses)
    grpc_batch: int = 64
    grpc_rounds: int = 21
    grpc_requests: int = 8  # requests per timed block
    sequences: int = 32
    sequence_batch: int = 8
    requests_per_sequence: int = 6
    session_rounds: int = 7
    session_policy: str = "alpha-bn"
    batch_delay_us: int = 5000  # the batching server's --batch-delay-us
    peers: bool = False
    peer_concurrencies: tuple[int, ...] | None = None  # None: run_peers' default
    peer_duration_s: float | None = None
    onnx: bool = True  # part 6: ONNX Runtime vs torch
    quick: bool = False


def quick_config() -> Config:
    """A smoke run (tests): two batch sizes, few repetitions, one request per sequence."""
    return Config(batch_sizes=(1, 16), reps=3, block_s=0.01, grpc_rounds=2, grpc_requests=1,
                  requests_per_sequence=1, session_rounds=2, quick=True)


def total_steps(config: Config) -> int:
    """Progress units of a run (one per timed pair, memory row and server round)."""
    adaptive = len(set(config.policies) - {"source"})
    steps = len(config.batch_sizes) * config.reps * max(adaptive, 1) + adaptive + 1  # source alone: one pair per rep
    if config.server:
        steps += config.grpc_rounds + config.session_rounds + 1
    if config.onnx:
        from ttaserve.bench.perf_onnx import onnx_policies

        on_ort = len(onnx_policies(config.policies))
        steps += len(config.batch_sizes) * config.reps * (on_ort + max(on_ort - 1, 1))
    return steps


def _machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(), "load_avg_start": list(os.getloadavg()),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
    }


def run(config: Config, progress: Progress, out_dir: str | Path) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-able result (see :mod:`ttaserve.bench.perf_report`)."""
    if "source" not in config.policies:
        config = replace(config, policies=("source", *config.policies))
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    result: dict[str, Any] = {"benchmark": "perf", "config": asdict(config), "machine": _machine()}
    model = bench_model(config.adanpc_entries)
    images, result["data"] = bench_images(config.data, 4096)
    overhead: dict[str, Any] = {}
    subjects: dict[str, Subject] = {}
    for batch in sorted(config.batch_sizes):
        subjects = {p: Subject.of(model, p) for p in config.policies}  # fresh sessions per size
        overhead[str(batch)] = measure_overhead(subjects, split(images, batch, 4), config.reps,
                                                config.block_s, config.seed, progress)
    result["overhead"] = overhead
    result["memory"] = measure_memory(subjects, split(images, max(config.batch_sizes), 1)[0], progress)
    if config.server:
        result.update(_server_parts(config, model, images, Path(out_dir), progress))
    if config.onnx:
        from ttaserve.bench.perf_onnx import measure_onnx

        result["onnx"] = measure_onnx(model, images, config.batch_sizes, config.policies, config.reps,
                                      config.block_s, config.seed, config.threads or torch.get_num_threads(),
                                      progress)
    if config.peers:
        result["peers"] = _peers(config, out_dir)
    result["machine"]["load_avg_end"] = list(os.getloadavg())
    result["goals"] = check_goals(result)
    return result


def _streams(images: torch.Tensor, config: Config) -> dict[int, list[Any]]:
    """One stream per sequence id (1..N), each with its own contrast (its own shift)."""
    streams = {}
    batches = split(images, config.sequence_batch, config.sequences * config.requests_per_sequence)
    for s in range(config.sequences):
        contrast = 1.0 - 0.75 * s / max(config.sequences - 1, 1)
        own = batches[s * config.requests_per_sequence:(s + 1) * config.requests_per_sequence]
        streams[s + 1] = [(0.5 + (x - 0.5) * contrast).numpy() for x in own]
    return streams


def _server_parts(config: Config, model: Any, images: torch.Tensor, out_dir: Path,
                  progress: Progress) -> dict[str, Any]:
    from ttaserve.bench.perf_grpc import grpc_vs_inprocess, many_sessions, served
    from ttaserve.engine import Engine
    from ttaserve.models import demo
    from ttaserve.server.app import safety_config
    from ttaserve.server.settings import ServerSettings

    threads = config.threads if config.threads > 0 else torch.get_num_threads()
    configs = {"plain": 0, "batched": config.batch_delay_us}
    with served(out_dir / "servers", threads, configs) as urls:
        grpc = grpc_vs_inprocess(urls["plain"], Engine(model, "source"),
                                 [x.numpy() for x in split(images, config.grpc_batch, 4)],
                                 config.grpc_rounds, config.grpc_requests, progress)
        # the reference is the model as the server loads it (perf's own model has an
        # enlarged AdaNPC memory), with the server's safety net
        sessions = many_sessions(urls, _streams(images, config), config.session_policy,
                                 Engine(demo(), safety=safety_config(ServerSettings())),
                                 config.session_rounds, progress)
    sessions["batch_delay_us"] = config.batch_delay_us
    return {"grpc": grpc, "sessions": sessions}


def _peers(config: Config, out_dir: str | Path) -> dict[str, Any]:
    """Part 4, run by :func:`ttaserve.bench.peers.run_peers` (its own files: peers.json/png)."""
    try:
        from ttaserve.bench.peers import run_peers
    except ImportError as exc:
        return {"status": "unavailable", "reason": f"ttaserve.bench.peers: {exc}"}
    return run_peers(out_dir, config.quick, config.peer_concurrencies, config.peer_duration_s,
                     threads=config.threads if config.threads > 0 else torch.get_num_threads())
