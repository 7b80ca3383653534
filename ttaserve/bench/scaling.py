"""Scale-out measurements (docs/BENCHMARKS.md "Scaling out"), in one run so the ratios
share the machine's conditions:

- **throughput**: closed-loop clients (one sequence each, ``--batch`` images per request,
  policy ``--policy``) for ``--seconds`` against one ``ttaserve serve`` process, and against
  ``ttaserve ray-serve`` with 1 and with 2 replicas;
- **proxy overhead**: one client, sequential requests of one image with the ``source``
  policy (no adaptation, so the difference is transport), a direct server and a 1-replica
  deployment up at once and measured in alternating blocks; and the latency of ``tent``
  requests with write-through vs periodic snapshots;
- ``--stores-only``: the in-process cost of one write-through per store (no Ray).

``python -m ttaserve.bench.scaling --out ttaserve-results`` (needs the ray extra and about
6 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ttaserve.bench.peer_servers import free_port
from ttaserve.bench.perf_grpc import stop, wait_ready


@contextmanager
def serve(args: list[str]) -> Iterator[str]:
    """`ttaserve serve` on free ports, its output in a log file (a pipe nobody reads would
    stall it); yields its gRPC address."""
    port = free_port()
    url = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "ttaserve", "serve", "--grpc-port", str(port),
                                     "--metrics-port", "-1", *args], stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(proc, url, log, 180)
            yield url
        finally:
            stop(proc)


@contextmanager
def ray_serve(replicas: int, args: list[str], interval: float) -> Iterator[str]:
    """`ttaserve ray-serve` with a directory store; yields the proxy's address."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ttaserve", "ray-serve", "--replicas", str(replicas),
                 "--state-store", str(Path(tmp) / "states"), "--state-interval", str(interval),
                 "--grpc-port", str(port), "--metrics-port", "-1", *args],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        try:
            while "ttaserve ray-serve ready" not in log.read_text(errors="replace"):
                if proc.poll() is not None:
                    raise RuntimeError("ray-serve did not start:\n" + log.read_text()[-2000:])
                time.sleep(1)
            yield f"127.0.0.1:{port}"
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)


def _input(x: np.ndarray) -> Any:
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def throughput(url: str, clients: int, batch: int, seconds: float, warmup_s: float = 3.0) -> float:
    """Requests per second of ``clients`` closed-loop clients, one sequence each."""
    import tritonclient.grpc as grpcclient

    counts = [0] * clients
    measuring, stop = threading.Event(), threading.Event()

    def loop(i: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        x = np.random.default_rng(i).random((batch, 1, 28, 28), dtype=np.float32)
        while not stop.is_set():
            client.infer("demo", [_input(x)], sequence_id=i + 1)
            if measuring.is_set():
                counts[i] += 1
        client.close()

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(warmup_s)
    measuring.set()
    started = time.perf_counter()
    time.sleep(seconds)
    total, elapsed = sum(counts), time.perf_counter() - started
    stop.set()
    for t in threads:
        t.join(30)
    return total / elapsed


def latency_ms(url: str, n: int, sequence: int | None = 1, batch: int = 1, warmup: int = 20) -> float:
    """Median latency of ``n`` sequential requests (after ``warmup`` requests)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    x = np.random.default_rng(0).random((batch, 1, 28, 28), dtype=np.float32)
    times = []
    for i in range(n + warmup):
        t = time.perf_counter()
        client.infer("demo", [_input(x)], sequence_id=sequence or 0)
        if i >= warmup:
            times.append((time.perf_counter() - t) * 1e3)
    client.close()
    return statistics.median(times)


def write_cost_ms(store_url: str, policy: str, batch: int, n: int = 60, sequence: int = 1) -> dict[str, float]:
    """In-process: median time of one write-through (snapshot, envelope, store write) after a
    ``policy`` request of ``batch`` demo images, and the record's size."""
    import torch

    from ttaserve.deploy.shared import SharedSessions
    from ttaserve.deploy.stores import open_store
    from ttaserve.engine import Engine
    from ttaserve.models import demo

    store = open_store(store_url)
    engine = Engine(demo(), policy=policy)
    shared = SharedSessions(store, "demo", engine)
    x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    times, snapshots = [], []
    for _ in range(n):
        engine.predict(x, sequence)
        t = time.perf_counter()
        shared.after_request(sequence)
        times.append((time.perf_counter() - t) * 1e3)
        session = engine.sessions.get(sequence)
        assert session is not None, "the write was refused"
        t = time.perf_counter()
        engine.snapshot_of(session)
        snapshots.append((time.perf_counter() - t) * 1e3)
    record = store.read(shared.key(sequence))
    store.close()
    return {"write_ms": statistics.median(times), "snapshot_only_ms": statistics.median(snapshots),
            "bytes": float(len(record.data)) if record else 0.0}


def store_costs(batch: int) -> dict[str, dict[str, float]]:
    """Write-through cost per request for both stores (Redis only if redis-server is here)."""
    import shutil

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, policy in enumerate(("tent", "unmix-tns"), 1):
            out[f"directory/{policy}"] = write_cost_ms(str(Path(tmp) / "states"), policy, batch, sequence=i)
        server = shutil.which("redis-server")
        if server:
            port = free_port()
            redis = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
            try:
                time.sleep(1.0)
                for i, policy in enumerate(("tent", "unmix-tns"), 1):
                    out[f"redis/{policy}"] = write_cost_ms(f"redis://127.0.0.1:{port}/0", policy, batch,
                                                           sequence=i)
            finally:
                redis.terminate()
                redis.wait(10)
    return out


def interleaved_latency(urls: dict[str, str], rounds: int, per_round: int, batch: int = 1,
                        sequence: int | None = 1) -> dict[str, float]:
    """Median latency per target, measured in alternating blocks (so that a change of the
    machine's load hits every target alike), and the median per-round ratio to the first."""
    blocks: dict[str, list[float]] = {name: [] for name in urls}
    for r in range(rounds):
        order = list(urls) if r % 2 == 0 else list(reversed(urls))
        for name in order:
            blocks[name].append(latency_ms(urls[name], per_round, sequence, batch, warmup=3))
    first = next(iter(urls))
    out = {f"{name}_ms": statistics.median(values) for name, values in blocks.items()}
    for name in list(urls)[1:]:
        out[f"{name}_over_{first}"] = statistics.median(b / a for a, b in zip(blocks[first], blocks[name]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ttaserve.bench.scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="ttaserve-results")
    parser.add_argument("--policy", default="tent")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--requests", type=int, default=300, help="sequential requests for latency")
    parser.add_argument("--stores-only", action="store_true",
                        help="only the in-process write-through cost of each store (no Ray)")
    args = parser.parse_args(argv)
    if args.stores_only:
        import torch

        torch.set_num_threads(1)
        costs = {"load_before": os.getloadavg(), "batch": args.batch, "stores": store_costs(args.batch),
                 "load_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "stores.json").write_text(json.dumps(costs, indent=2))
        print(json.dumps(costs, indent=2))
        return 0
    common = ["--torch-threads", "1"]
    result: dict[str, Any] = {"load_before": os.getloadavg(), "args": vars(args),
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    tp = ["--policy", args.policy, *common]
    with serve(["--policy", "source", *common]) as direct, \
            ray_serve(1, ["--policy", "source", *common], interval=0.0) as proxied:
        rounds = max(1, args.requests // 15)
        result["latency_sequenced"] = interleaved_latency({"direct": direct, "proxy": proxied}, rounds, 15)
        result["latency_unsequenced"] = interleaved_latency({"direct": direct, "proxy": proxied}, rounds, 15,
                                                            sequence=None)
    with serve(["--policy", args.policy, "--torch-threads", "2"]) as url:
        result["direct_rps"] = throughput(url, args.clients, args.batch, args.seconds)
    with ray_serve(1, tp, interval=0.0) as url:
        result["ray1_rps"] = throughput(url, args.clients, args.batch, args.seconds)
        result["proxy_tent_write_through_ms"] = latency_ms(url, args.requests // 2, batch=args.batch)
    with ray_serve(1, tp, interval=30.0) as url:
        result["proxy_tent_periodic_ms"] = latency_ms(url, args.requests // 2, batch=args.batch)
    with ray_serve(2, tp, interval=0.0) as url:
        result["ray2_rps"] = throughput(url, args.clients, args.batch, args.seconds)
    result["load_after"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
