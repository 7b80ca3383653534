"""Serving cost over gRPC: ttaserve in a subprocess (``python -m ttaserve serve``), driven by
the stock ``tritonclient`` from this process.

* :func:`grpc_vs_inprocess`: one client sending batch-64 requests one after another (source
  policy) against :meth:`Engine.predict` in this process on the same batches, blocks
  interleaved; the ratio is taken per round and its median reported.
* :func:`many_sessions`: 32 sequences, each with its own id and its own data, sending
  batch-8 requests. Three ways per round: one client sending every request one at a time;
  32 threads at once against a plain server; 32 threads at once against a server with
  dynamic batching (``--batch-delay-us``). Every response is compared with the same
  sequence run alone in-process.

A server in its own process is what a client meets in production, and it keeps the client's
Python threads from competing with the server's event loop for one interpreter lock.
"""

from __future__ import annotations

import contextlib
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ttaserve.bench.peer_servers import free_port
from ttaserve.engine import Engine

__all__ = ["grpc_vs_inprocess", "many_sessions", "served"]

Progress = Callable[[int, str], None]
Streams = dict[int, list[np.ndarray]]
MODEL = "demo"
GRPC_SEQUENCES = (10_001, 10_002)  # part 2's ids, apart from the many-sessions ids 1..N


def _client(url: str) -> Any:
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(url)


@contextlib.contextmanager
def served(log_dir: Path, threads: int, configs: dict[str, int],
           timeout_s: float = 180.0) -> Iterator[dict[str, str]]:
    """Start one server per ``{name: batch_delay_us}`` (all at once, so their start-up
    overlaps); yields ``{name: url}`` and stops them all on exit."""
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: dict[str, tuple[subprocess.Popen[bytes], str, Path]] = {}
    try:
        for name, delay_us in configs.items():
            port, log = free_port(), log_dir / f"ttaserve-{name}.log"
            command = [sys.executable, "-m", "ttaserve", "--log-level", "WARNING", "serve",
                       "--grpc-port", str(port), "--metrics-port", "-1", "--policy", "source",
                       "--torch-threads", str(threads), "--batch-delay-us", str(delay_us)]
            with open(log, "wb") as sink:
                proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
            procs[name] = (proc, f"127.0.0.1:{port}", log)
        for proc, url, log in procs.values():
            wait_ready(proc, url, log, timeout_s)
        yield {name: url for name, (_, url, _) in procs.items()}
    finally:
        for proc, _, _ in procs.values():
            stop(proc)


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float) -> None:
    client, deadline = _client(url), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ttaserve exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        with contextlib.suppress(Exception):
            if client.is_server_ready():
                return
        time.sleep(0.2)
    raise RuntimeError(f"ttaserve at {url} not ready after {timeout_s:.0f} s (log: {log})")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _infer(client: Any, x: np.ndarray, sequence_id: int, params: dict[str, Any] | None = None,
           start: bool = False) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(MODEL, [tensor], sequence_id=sequence_id, sequence_start=start, parameters=params)
    return result.as_numpy("logits")


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def grpc_vs_inprocess(url: str, engine: Engine, batches: list[np.ndarray], rounds: int,
                      inner: int, progress: Progress) -> dict[str, Any]:
    """Throughput (images/s) of sequential requests over gRPC vs in-process, same batches."""
    client = _client(url)
    local = [torch.from_numpy(x) for x in batches]

    def remote_block() -> None:
        for i in range(inner):
            _infer(client, batches[i % len(batches)], GRPC_SEQUENCES[0])

    def local_block() -> None:
        for i in range(inner):
            engine.predict(local[i % len(local)], session=GRPC_SEQUENCES[0])

    check = GRPC_SEQUENCES[1]
    diff = float(np.abs(_infer(client, batches[0], check) - engine.predict(local[0], session=check).numpy()).max())
    remote_block()  # warm-up: connection, sessions, allocator
    local_block()
    samples: dict[str, list[float]] = {"grpc": [], "inprocess": []}
    before = _server_times(client)
    for r in range(rounds):
        blocks = [("grpc", remote_block), ("inprocess", local_block)]
        for name, block in blocks if r % 2 == 0 else blocks[::-1]:
            samples[name].append(inner * batches[0].shape[0] / _timed(block))
        progress(1, "grpc vs in-process")
    ratios = [g / i for g, i in zip(samples["grpc"], samples["inprocess"])]
    after = _server_times(client)
    count = max(after["count"] - before["count"], 1)
    server_ms = {k: (after[k] - before[k]) / count / 1e6 for k in ("request", "queue", "compute")}
    return {"server_ms_per_request": server_ms,"batch": int(batches[0].shape[0]), "rounds": rounds, "requests_per_block": inner,
            "grpc_img_s": statistics.median(samples["grpc"]),
            "inprocess_img_s": statistics.median(samples["inprocess"]),
            "ratio": statistics.median(ratios), "ratio_iqr": _iqr(ratios), "ratios": ratios,
            "max_abs_diff": diff}


def _server_times(client: Any) -> dict[str, int]:
    """The server's cumulative request, queue and compute nanoseconds (Triton statistics)."""
    stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]["inference_stats"]

    def ns(key: str) -> int:
        return int(stats.get(key, {}).get("ns", 0))

    return {"count": int(stats.get("success", {}).get("count", 0)), "request": ns("success"),
            "queue": ns("queue"), "compute": ns("compute_infer")}


def _iqr(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def _sequential(client: Any, streams: Streams, params: dict[int, dict[str, Any]]) -> dict[tuple[int, int], np.ndarray]:
    out = {}
    for k in range(len(next(iter(streams.values())))):
        for sid, batches in streams.items():
            out[(sid, k)] = _infer(client, batches[k], sid, params[sid], start=k == 0)
    return out


def _concurrent(clients: dict[int, Any], streams: Streams,
                params: dict[int, dict[str, Any]]) -> tuple[float, dict[tuple[int, int], np.ndarray]]:
    """All sequences at once, one thread each; wall time from a common start to the last reply."""
    out: dict[tuple[int, int], np.ndarray] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(streams) + 1)

    def run(sid: int) -> None:
        barrier.wait()
        try:
            for k, x in enumerate(streams[sid]):
                out[(sid, k)] = _infer(clients[sid], x, sid, params[sid], start=k == 0)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(sid,), daemon=True) for sid in streams]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} sequences failed, first: {errors[0]!r}")
    return wall, out


def many_sessions(urls: dict[str, str], streams: Streams, policy: str, reference: Engine,
                  rounds: int, progress: Progress) -> dict[str, Any]:
    """Throughput of the three ways to serve the same sequences, and their ratios per round.
    ``policy`` may name several policies (comma-separated): sequence i runs the i-th, round
    robin. Every run starts each sequence afresh (``sequence_start``), so every run of a
    stateful policy can be compared with the sequence alone."""
    names = policy.split(",")
    params = {sid: {"tta_policy": names[i % len(names)]} for i, sid in enumerate(streams)}
    seq_client = _client(urls["plain"])
    clients = {name: {sid: _client(urls[name]) for sid in streams} for name in ("plain", "batched")}
    images = sum(x.shape[0] for batches in streams.values() for x in batches)
    samples: dict[str, list[float]] = {"sequential": [], "concurrent": [], "batched": []}
    outputs: dict[str, dict[tuple[int, int], np.ndarray]] = {}
    for r in range(rounds + 1):  # round 0 warms up (sessions, connections) and is not timed
        runs: list[tuple[str, Callable[[], Any]]] = [
            ("sequential", lambda: (None, _sequential(seq_client, streams, params))),
            ("concurrent", lambda: _concurrent(clients["plain"], streams, params)),
            ("batched", lambda: _concurrent(clients["batched"], streams, params)),
        ]
        for name, run in runs if r % 2 == 0 else runs[::-1]:
            start = time.perf_counter()
            wall, out = run()
            wall = wall if wall is not None else time.perf_counter() - start
            outputs.setdefault(name, out)
            if r > 0:
                samples[name].append(images / wall)
        progress(1, "many sessions")
    return _sessions_result(samples, outputs, streams, reference, urls["batched"], policy, params)


def _isolated_diff(outputs: dict[tuple[int, int], np.ndarray], streams: Streams, reference: Engine,
                   params: dict[int, dict[str, Any]]) -> float:
    """Largest difference from each sequence predicted alone, in order, in this process."""
    worst = 0.0
    for sid, batches in streams.items():
        reference.sessions.end(sid)
        for k, x in enumerate(batches):
            alone = reference.predict(torch.from_numpy(x), session=sid, policy=params[sid]["tta_policy"]).numpy()
            worst = max(worst, float(np.abs(outputs[(sid, k)] - alone).max()))
    return worst


def _sessions_result(samples: dict[str, list[float]], outputs: dict[str, dict[tuple[int, int], np.ndarray]],
                     streams: Streams, reference: Engine, batched_url: str, policy: str,
                     params: dict[int, dict[str, Any]]) -> dict[str, Any]:
    stats = _client(batched_url).get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    executions, inferences = int(stats.get("execution_count", 0)), int(stats.get("inference_count", 0))
    base = samples["sequential"]
    return {
        "policy": policy, "sequences": len(streams),
        "requests_per_sequence": len(next(iter(streams.values()))),
        "batch": int(next(iter(streams.values()))[0].shape[0]),
        **{f"{k}_img_s": statistics.median(v) for k, v in samples.items()},
        "batched_vs_sequential": statistics.median([b / s for b, s in zip(samples["batched"], base)]),
        "batched_vs_sequential_iqr": _iqr([b / s for b, s in zip(samples["batched"], base)]),
        "concurrent_vs_sequential": statistics.median([c / s for c, s in zip(samples["concurrent"], base)]),
        "batched_mean_forward_images": inferences / executions if executions else None,
        "max_abs_diff_vs_isolated": {k: _isolated_diff(v, streams, reference, params) for k, v in outputs.items()},
    }
