"""Peer servers benchmark: ttaserve (source policy, and adapting every batch with alpha-bn)
against Triton, MLServer and TorchServe serving the unadapted model.

Every server serves the same demo model (batch 64, FP32 [64, 1, 28, 28] -> logits [64, 10],
eval mode, the same torch thread count) as a subprocess on loopback ports, one server at a
time, and the same load generator in this process drives each at several concurrencies
(closed loop: every worker thread sends its next request as soon as the last returns).

Peers run from a separate virtualenv (``.venv-peers``, made by scripts/bench-peers.sh) so
their pins never touch ttaserve's; the files that run inside each peer server live in ``bench/peer_scripts/``.

Wire paths (all gRPC, one load generator: :func:`measure`, the same threads, closed loop,
images and timing for every server; only the client object each thread calls differs):
- ttaserve, Triton (nvidia-pytriton's bundled tritonserver): stock tritonclient gRPC
  (``ModelInfer``, the batch as one FP32 tensor).
- MLServer (custom runtime): stock tritonclient gRPC too; MLServer implements the same
  ``inference.GRPCInferenceService`` (KServe v2) and answers raw bytes to raw requests.
- TorchServe (custom handler): not tritonclient but TorchServe's own gRPC API,
  ``org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions``, called through
  grpcio's generic unary-unary stub (one channel per client thread, like tritonclient):
  the request carries the model name and the 64 images as one little-endian float32 bytes
  field, the response the 64x10 logits as float32 bytes; no tensor metadata is encoded or
  decoded on either side, so this path does slightly less client work than ModelInfer.
  Its KServe v2 service lives under another package name, so tritonclient cannot reach
  it. The two messages are described at run time in a private descriptor pool.

Equal terms: every server process, and every worker process it starts (MLServer's
inference pool, TorchServe's Java frontend and Python workers, Triton's server and Python
backend stubs), starts with the same environment for threads (``OMP_NUM_THREADS``,
``MKL_NUM_THREADS``, and the torch thread count) and for the allocator, and runs the model
in the same memory layout (channels-last, how ttaserve runs a convolutional model; the peers
get ``TTASERVE_PEER_CHANNELS_LAST=1``). ``--allocator
tuned`` (the default) gives all of them ttaserve's own malloc setting
(``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824``, what
``ttaserve.server.memory`` sets in-process); ``--allocator default`` gives it to nobody and
starts ttaserve with ``--no-keep-freed-memory``. After each server answers, the initial
environment of every process in its session is read from ``/proc`` and recorded
(``env_check``), so a worker that did not inherit the setting shows up in the result.

Server settings (documented choices): one model instance / worker everywhere, like
ttaserve's one worker per model. Triton keeps pytriton's dynamic batcher with
max_batch_size 256 (ttaserve's default largest batch), MLServer its default of one
parallel inference worker process, TorchServe batch size 1 (its default). Every server
gets the same torch intra-op thread count (``threads``, ttaserve's ``--torch-threads``) and
OMP_NUM_THREADS; the default is 1 because on a 2-core machine shared with the client, two
OpenMP threads that get preempted spin at barriers and made a batch-64 forward ~15x slower.
The first request of each server must equal the in-process model's output (``max_abs_diff``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ttaserve.bench.charts import draw
from ttaserve.bench.peer_servers import (
    ALLOCATORS,
    LAUNCHERS,
    PeerError,
    Setup,
    check_environments,
    check_installed,
    equal_terms,
    serving,
)
from ttaserve.bench.perf_report import shown

__all__ = ["GOALS", "PEERS", "PeerError", "format_table", "measure", "run_peers"]

log = logging.getLogger(__name__)

BATCH = 64
PUBLISHABLE = {"duration_s": 10.0, "rounds": 2.0}  # least seconds per point and interleaved rounds
GOALS = {"triton": 1.2, "mlserver": 1.2, "torchserve": 1.2}  # ttaserve (source) / peer throughput
ADAPTING = "ttaserve-alpha-bn"  # ttaserve adapting every batch; its goal: >= 1.0x every peer
ADAPTING_GOAL = 1.0
PEERS = ("ttaserve", ADAPTING, "triton", "mlserver", "torchserve")
_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parents[1]


Caller = Callable[[np.ndarray], np.ndarray]  # images [B,1,28,28] -> logits [B,10]


def measure(client: Callable[[], Caller], images: np.ndarray, concurrency: int,
            duration_s: float, warmup_s: float) -> dict[str, Any]:
    """Closed-loop load: ``concurrency`` threads, each with its own client (own gRPC channel),
    send ``images`` back to back; requests started within ``duration_s`` after a warm-up count."""
    import threading

    callers = [client() for _ in range(concurrency)]
    latencies: list[list[float]] = [[] for _ in callers]
    errors: list[str] = []
    start_at = time.perf_counter() + warmup_s + 0.2
    stop_at = start_at + duration_s

    def worker(call: Caller, record: list[float]) -> None:
        while (now := time.perf_counter()) < stop_at:
            try:
                call(images)
            except Exception as exc:  # a failing peer is a result, not a crash
                errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                return
            if now >= start_at:
                record.append(time.perf_counter() - now)

    threads = [threading.Thread(target=worker, args=pair, daemon=True) for pair in zip(callers, latencies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=duration_s + warmup_s + 120)
    elapsed = time.perf_counter() - start_at  # includes the tail of the last requests
    return _stats([x for lat in latencies for x in lat], elapsed, len(images), concurrency, errors)


def _stats(latencies: list[float], elapsed: float, batch: int, concurrency: int,
           errors: list[str]) -> dict[str, Any]:
    lat = np.asarray(latencies) * 1e3
    done = len(lat)
    return {
        "concurrency": concurrency,
        "requests": done,
        "seconds": round(elapsed, 3),
        "req_per_s": done / elapsed if elapsed > 0 else 0.0,
        "images_per_s": done * batch / elapsed if elapsed > 0 else 0.0,
        "p50_ms": float(np.percentile(lat, 50)) if done else None,
        "p99_ms": float(np.percentile(lat, 99)) if done else None,
        "mean_ms": float(lat.mean()) if done else None,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _direct_client() -> Callable[[], Caller]:
    """The plain torch forward in this process: the floor every server adds its overhead to."""
    import torch

    from ttaserve.adapters.model import prepare
    from ttaserve.models import demo

    model = prepare(demo())  # in the layout every server runs it in (channels-last)

    def call(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(images)).numpy()

    return lambda: call


def _adapted_reference(images: np.ndarray) -> np.ndarray:
    """What ttaserve serving alpha-bn must answer for ``images`` (no sequence id)."""
    import torch

    from ttaserve.engine import Engine
    from ttaserve.models import demo

    with torch.no_grad():
        return Engine(demo(), "alpha-bn").predict(torch.from_numpy(images)).numpy()


def _bench_server(name: str, setup: Setup, plan: dict[str, Any], progress: Any) -> dict[str, Any]:
    module, launcher = LAUNCHERS[name]
    try:
        if module is not None:
            check_installed(setup.peers_python, module)
    except PeerError as exc:
        progress.update(len(plan["concurrencies"]))
        return {"status": "not-installed", "reason": str(exc)}
    workdir = setup.workdir / name
    workdir.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    try:
        launch = launcher(replace(setup, workdir=workdir))
        with serving(launch, workdir / "server.log", plan["startup_timeout_s"], plan["images"]) as (call, sid):
            reference = plan["references"].get(name, plan["reference"])
            diff = float(np.abs(call(plan["images"]) - reference).max())
            env_check = check_environments(sid, equal_terms(setup.threads, setup.allocator))
            for concurrency in plan["concurrencies"]:
                progress.set_postfix_str(f"{name} c={concurrency}")
                runs.append(measure(launch.client, plan["images"], concurrency,
                                    plan["duration_s"], plan["warmup_s"]))
                progress.update(1)
    except (PeerError, OSError, subprocess.SubprocessError) as exc:
        progress.update(len(plan["concurrencies"]) - len(runs))
        log.warning("%s failed: %s", name, exc)
        return {"status": "failed", "reason": str(exc), "runs": runs}
    return {"status": "ok", "max_abs_diff": diff, "env_check": env_check, "runs": runs,
            "log": str(workdir / "server.log")}


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    merged = dict(runs[0])
    for key in ("seconds", "req_per_s", "images_per_s", "p50_ms", "p99_ms", "mean_ms"):
        values = [r[key] for r in runs if r[key] is not None]
        merged[key] = float(np.median(values)) if values else None
    merged["requests"] = sum(r["requests"] for r in runs)
    merged["errors"] = sum(r["errors"] for r in runs)
    merged["first_error"] = next((r["first_error"] for r in runs if r["first_error"]), None)
    return merged


def _merge_rounds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One server's rounds as medians per concurrency; the last failure wins if any."""
    last = results[-1]
    if last["status"] != "ok":
        return {**last, "rounds_done": len(results) - 1}
    columns = zip(*(r["runs"] for r in results))
    return {
        "status": "ok",
        "max_abs_diff": max(r["max_abs_diff"] for r in results),
        "env_check": [r["env_check"] for r in results],
        "runs": [_median_run(list(column)) for column in columns],
        "per_round": [r["runs"] for r in results],
        "log": last["log"],
    }


def _ratios(servers: dict[str, dict[str, Any]], mine: str = "ttaserve",
            goal: float | None = None) -> dict[str, list[dict[str, Any]]]:
    """``mine``/peer throughput and p99 ratio at each concurrency both measured (same run);
    the goal is ``goal``, else the peer's entry in GOALS."""
    own = {r["concurrency"]: r for r in servers.get(mine, {}).get("runs", [])}
    ratios: dict[str, list[dict[str, Any]]] = {}
    for name, result in servers.items():
        if name.startswith("ttaserve") or result.get("status") != "ok":
            continue
        rows = []
        target = goal if goal is not None else GOALS.get(name, 0.0)
        for run in result["runs"]:
            ours = own.get(run["concurrency"])
            if not ours or not run["req_per_s"] or not ours["req_per_s"]:
                continue
            ratio = ours["req_per_s"] / run["req_per_s"]
            rows.append({"concurrency": run["concurrency"], "throughput": ratio,
                         "p99": ours["p99_ms"] / run["p99_ms"], "goal": target, "goal_met": ratio >= target})
        ratios[name] = rows
    return ratios


def run_peers(out_dir: str | Path, quick: bool = False, concurrencies: Sequence[int] | None = None,
              duration_s: float | None = None, *, peers: Sequence[str] = PEERS, threads: int = 1,
              peers_venv: str | Path | None = None, rounds: int | None = None,
              startup_timeout_s: float = 240.0, allocator: str = "tuned") -> dict[str, Any]:
    """Benchmark ttaserve and its peers one after another in this run; write ``peers.json``
    and ``peers.png`` under ``out_dir`` and return the same result.

    Each of ``rounds`` rounds (default 1 quick, 2 otherwise) starts every server in turn,
    in reverse order on odd rounds so that a drift in the machine's load hits all alike;
    the figures reported are medians over rounds (``per_round`` keeps each round's).

    ``threads`` is the torch intra-op thread count of every server (ttaserve's
    ``--torch-threads``): 1 by default because on a small shared machine the client, the
    server's I/O threads and OpenMP's spinning workers otherwise fight for the same cores.
    ``allocator`` (``tuned`` or ``default``) is the malloc setting every server gets alike.
    A peer that is not installed or fails is recorded with the reason; the rest go on.
    """
    # Absolute once, here: servers run in their own scratch directories, where a relative
    # path would be applied a second time. Never resolved: bin/python is a symlink out of
    # the virtualenv.
    out = Path(out_dir).absolute()
    _check_args(peers, allocator)
    out.mkdir(parents=True, exist_ok=True)
    venv = Path(peers_venv or os.environ.get("TTASERVE_PEERS_VENV") or _REPO / ".venv-peers").absolute()
    plan = _plan(quick, concurrencies, duration_s, startup_timeout_s)
    from tqdm import tqdm

    rounds = rounds or (1 if quick else 2)
    direct = _direct_client()
    with _torch_threads(threads):
        plan["reference"] = direct()(plan["images"])
        plan["references"] = {ADAPTING: _adapted_reference(plan["images"])}
    done: dict[str, list[dict[str, Any]]] = {name: [] for name in peers}
    baselines = []
    load_before = os.getloadavg()
    total = rounds * len(peers) * len(plan["concurrencies"])
    with tqdm(total=total, desc="peers", unit="run") as progress:
        for index in range(rounds):
            with _torch_threads(threads):
                baselines.append(measure(direct, plan["images"], 1, plan["duration_s"], plan["warmup_s"]))
            setup = Setup(venv / "bin" / "python", threads, out / "servers" / f"round{index}", allocator)
            for name in peers if index % 2 == 0 else peers[::-1]:
                if done[name] and done[name][-1]["status"] != "ok":  # no retry of a broken peer
                    progress.update(len(plan["concurrencies"]))
                    continue
                done[name].append(_bench_server(name, setup, plan, progress))
    servers = {name: _merge_rounds(results) for name, results in done.items()}
    result = {
        "batch": BATCH,
        "threads": threads,
        "allocator": allocator,
        "layout": "channels-last (NHWC)",
        "server_env": equal_terms(threads, allocator),
        "concurrencies": plan["concurrencies"],
        "duration_s": plan["duration_s"],
        "warmup_s": plan["warmup_s"],
        "rounds": rounds,
        **_publishable(quick, plan["duration_s"], rounds),
        "cpus": os.cpu_count(),
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "direct": _median_run(baselines),
        "servers": servers,
        "ratios": _ratios(servers),
        "ratios_adapting": _ratios(servers, ADAPTING, ADAPTING_GOAL),
    }
    (out / "peers.json").write_text(json.dumps(result, indent=2))
    draw(out / "peers.png", lambda plt, path: _chart(plt, result, path))
    return result


def _check_args(peers: Sequence[str], allocator: str) -> None:
    unknown = set(peers) - set(PEERS)
    if unknown:
        raise ValueError(f"unknown peers {sorted(unknown)}; choose from {PEERS}")
    if allocator not in ALLOCATORS:
        raise ValueError(f"unknown allocator {allocator!r}; choose from {ALLOCATORS}")


def _plan(quick: bool, concurrencies: Sequence[int] | None, duration_s: float | None,
          startup_timeout_s: float) -> dict[str, Any]:
    return {
        "concurrencies": list(concurrencies or ((1, 4) if quick else (1, 4, 8))),
        "duration_s": float(duration_s or (2.0 if quick else 15.0)),
        "warmup_s": 0.5 if quick else 2.0,
        "startup_timeout_s": startup_timeout_s,
        "images": np.random.default_rng(0).random((BATCH, 1, 28, 28), dtype=np.float32),
    }


def _publishable(quick: bool, duration_s: float, rounds: int) -> dict[str, Any]:
    """Whether the run is long enough for a published table (quick runs never are); a
    full run that is too short says so in the log too (2-s points swung 0.5x-1.3x)."""
    short = []
    if duration_s < PUBLISHABLE["duration_s"]:
        short.append(f"{duration_s:g} s per point (< {PUBLISHABLE['duration_s']:g})")
    if rounds < PUBLISHABLE["rounds"]:
        short.append(f"{rounds} round(s) (< {PUBLISHABLE['rounds']:g})")
    reasons = ["--quick", *short] if quick else short
    if short and not quick:
        log.warning("not publishable: %s", "; ".join(short))
    return {"publishable": not reasons, "not_publishable_because": reasons}


def _chart(plt: Any, result: dict[str, Any], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, server in result["servers"].items():
        runs = [r for r in server.get("runs", []) if r["requests"]]
        if server.get("status") != "ok" or not runs:
            continue
        conc = [r["concurrency"] for r in runs]
        style = {"linewidth": 2.5} if name.startswith("ttaserve") else {}
        left.plot(conc, [r["images_per_s"] for r in runs], marker="o", label=name, **style)
        right.plot(conc, [r["p99_ms"] for r in runs], marker="o", label=name, **style)
    left.set(title=f"Throughput (batch {result['batch']})", xlabel="concurrent clients",
             ylabel="images / s")
    left.set_ylim(bottom=0)  # from zero: the servers' differences at their true scale
    right.set(title="p99 latency", xlabel="concurrent clients", ylabel="ms", yscale="log")
    left.axhline(result["direct"]["images_per_s"], color="gray", linestyle="--",
                 label="torch in-process (c=1)")
    for axis in (left, right):
        axis.set_xticks(result["concurrencies"])
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    fig.suptitle(f"Demo model over gRPC, one server at a time, torch threads {result['threads']}, "
                 f"median of {result['rounds']} round(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(result: dict[str, Any]) -> str:
    """The result as a plain-text table: one row per server and concurrency, then the ratios."""
    lines = [f"{'server':<18}{'conc':>5}{'req/s':>9}{'img/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"]
    for name, server in result["servers"].items():
        if server.get("status") != "ok":
            reason = server.get("reason", "").splitlines()[0] if server.get("reason") else ""
            lines.append(f"{name:<18}{server.get('status')}: {reason}")
        for r in server.get("runs", []):
            p50 = f"{r['p50_ms']:.1f}" if r["p50_ms"] is not None else "-"
            p99 = f"{r['p99_ms']:.1f}" if r["p99_ms"] is not None else "-"
            lines.append(f"{name:<18}{r['concurrency']:>5}{r['req_per_s']:>9.1f}"
                         f"{r['images_per_s']:>9.0f}{p50:>9}{p99:>9}{r['errors']:>8}")
    d = result["direct"]
    lines.append(f"{'direct':<18}{1:>5}{d['req_per_s']:>9.1f}{d['images_per_s']:>9.0f}"
                 f"{d['p50_ms']:>9.1f}{d['p99_ms']:>9.1f}   (torch forward in this process, no server)")
    lines.append("")
    for title, key in (("ttaserve (source)", "ratios"), (f"{ADAPTING} (adapting every batch)", "ratios_adapting")):
        if not result.get(key):
            continue
        lines.append(f"{title} / peer serving the unadapted model (same run): throughput ratio [goal], "
                     "p99 ratio (lower is better)")
        for name, rows in result[key].items():
            for row in rows:
                mark = "met" if row["goal_met"] else "NOT met"
                lines.append(f"  vs {name:<11} c={row['concurrency']:<3} {shown(row['throughput'], row['goal'])}x "
                             f"[>= {row['goal']}: {mark}]  p99 {row['p99']:.2f}x")
    load = result["load_average"]
    lines.append(f"load average (1 min) before/after: {load['before'][0]:.1f} / {load['after'][0]:.1f}"
                 f" on {result['cpus']} CPUs")
    return "\n".join(lines + _terms_lines(result))


def _terms_lines(result: dict[str, Any]) -> list[str]:
    """What every server got alike, what the run is worth, and any process that differed."""
    env = " ".join(f"{k}={v}" for k, v in result.get("server_env", {}).items())
    lines = [f"every server: allocator {result.get('allocator', '?')}, torch threads {result['threads']}, "
             f"model layout {result.get('layout', 'contiguous (NCHW)')}, "
             f"env {env or '?'}; {result['duration_s']:g} s per point, median of {result['rounds']} round(s)"]
    if not result.get("publishable", False):
        because = "; ".join(result.get("not_publishable_because", [])) or "no record"
        lines.append(f"NOT publishable ({because}): use >= {PUBLISHABLE['duration_s']:g} s per point "
                     f"and >= {PUBLISHABLE['rounds']:g} rounds")
    for name, server in result["servers"].items():
        for check in server.get("env_check", []):
            for process in check["differing"]:
                lines.append(f"warning: {name} process {process['process']} started with {process['env']}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ttaserve.bench.peers", description=__doc__.splitlines()[0],
                                     epilog="A published table needs >= 10 s per point and >= 2 rounds; "
                                     "shorter runs are marked \"publishable\": false in peers.json.")
    parser.add_argument("--out", default="ttaserve-results/peers", help="output directory")
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None,
                        help="client concurrencies (default 1 4 8; quick 1 4)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per measurement (default 15; quick 2)")
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; quick 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every server")
    parser.add_argument("--peers-venv", default=None, help="virtualenv holding the peers")
    parser.add_argument("--allocator", choices=ALLOCATORS, default="tuned",
                        help="malloc setting of every server process: tuned (ttaserve's thresholds, "
                        "MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_, for all) or default (glibc's, for all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = run_peers(args.out, args.quick, args.concurrency, args.duration, peers=args.peers,
                       threads=args.threads, peers_venv=args.peers_venv, rounds=args.rounds,
                       allocator=args.allocator)
    print(format_table(result))
    out = Path(args.out).absolute()
    written = [p for p in (out / "peers.json", out / "peers.png") if p.exists()]
    print(f"\nwritten: {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
