"""Ray Serve end to end (slow): `ttaserve ray-serve` with 2 replicas on a local Ray cluster,
loopback only, stock tritonclient through Ray's gRPC proxy, compared with a single
`ttaserve serve` process on the same stream.

- every sequence stays on one replica while the replica set is stable, and the logits
  equal the single server's bit for bit;
- a replica killed with SIGKILL between requests: with write-through snapshots (interval 0)
  no sequence loses anything; with a 1 s interval (Redis store) a sequence that moved
  resumes from its last snapshot, which is at most the interval old, and a sequence that
  did not move is untouched.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.deploy.conftest import start_redis
from tests.server.conftest import infer_input, start_process
from ttaserve.bench.peer_servers import free_port
from ttaserve.data import load_split
from ttaserve.deploy.metrics import REGISTRY
from ttaserve.deploy.stores import open_store
from ttaserve.healthcheck import check
from ttaserve.server.keys import SessionKey
from ttaserve.server.state_files import decode_file, file_name
from ttaserve.snapshot import decode

pytest.importorskip("ray.serve", reason="pip install -e '.[ray]' (scripts/test-slow.sh does)")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SEQUENCES = list(range(1, 21))
BATCH = 8
SERVE_ARGS = ("--policy", "tent", "--torch-threads", "1")


@dataclass
class Deployment:
    proc: subprocess.Popen[bytes]
    url: str
    metrics: str
    store_url: str
    log: Path


SECRET = "5ec7e7" * 11  # the replicas' shared secret: this test reads their records


def start_ray_serve(tmp: Path, store_url: str, interval: float) -> Deployment:
    grpc_port, metrics_port, log = free_port(), free_port(), tmp / "ray-serve.log"
    secret = tmp / "secret"
    secret.write_text(SECRET)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ttaserve", "ray-serve", "--replicas", "2", "--state-store", store_url,
             "--state-interval", str(interval), "--grpc-port", str(grpc_port), "--metrics-port",
             str(metrics_port), "--secret-file", str(secret), *SERVE_ARGS],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        )
    deadline = time.monotonic() + 300
    while "ttaserve ray-serve ready" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("ray-serve did not start:\n" + log.read_text(errors="replace")[-3000:])
        time.sleep(1)
    return Deployment(proc, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics", store_url, log)


def stop(d: Deployment) -> None:
    d.proc.send_signal(signal.SIGTERM)
    try:
        d.proc.wait(120)
    except subprocess.TimeoutExpired:
        d.proc.kill()
        d.proc.wait(30)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    x, _ = load_split("test")
    return x[:2000].numpy()


def batch_of(images: np.ndarray, seq: int, step: int) -> np.ndarray:
    start = ((seq * 37 + step * 11) * BATCH) % (len(images) - BATCH)
    return np.ascontiguousarray(images[start:start + BATCH])


@dataclass
class Run:
    """What one client saw: per sequence, the logits and the replica of every step."""

    logits: dict[int, list[np.ndarray]] = field(default_factory=dict)
    replicas: dict[int, list[str]] = field(default_factory=dict)
    sent_at: dict[int, list[float]] = field(default_factory=dict)
    retries: int = 0


def send(client: grpcclient.InferenceServerClient, run: Run, seq: int, x: np.ndarray, sid: int | None = None) -> None:
    for attempt in range(60):  # a request to a replica that just died fails; it was not answered
        try:
            result = client.infer("demo", [infer_input(x)], sequence_id=sid or seq, client_timeout=60)
            break
        except Exception:
            if attempt == 59:
                raise
            run.retries += 1
            time.sleep(0.5)
    run.logits.setdefault(seq, []).append(result.as_numpy("logits"))
    replica = result.get_response().parameters.get("ttaserve_replica")
    run.replicas.setdefault(seq, []).append(replica.string_param if replica is not None else "")
    run.sent_at.setdefault(seq, []).append(time.monotonic())


def rounds(url: str, images: np.ndarray, steps: range, run: Run | None = None) -> Run:
    run = run or Run()
    client = grpcclient.InferenceServerClient(url)
    for step in steps:
        for seq in SEQUENCES:
            send(client, run, seq, batch_of(images, seq, step))
    client.close()
    return run


@pytest.fixture(scope="module")
def single(images: np.ndarray) -> Iterator[tuple[str, Run]]:
    """The same stream on one `ttaserve serve` process: the reference."""
    proc, url, _ = start_process(*SERVE_ARGS)
    try:
        yield url, rounds(url, images, range(8))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def kill_replica(d: Deployment, replica: str) -> None:
    store = open_store(d.store_url)
    info = json.loads(store.read(f"{REGISTRY}/{replica}").data)  # type: ignore[union-attr]
    store.close()
    os.kill(int(info["pid"]), signal.SIGKILL)


def assert_same(got: list[np.ndarray], expected: list[np.ndarray], what: str) -> None:
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert np.array_equal(g, e), f"{what}: step {i} differs from the single server"


def test_affinity_equality_and_lossless_failover(tmp_path: Path, images: np.ndarray,
                                                 single: tuple[str, Run]) -> None:
    d = start_ray_serve(tmp_path, f"file://{tmp_path / 'states'}", interval=0.0)
    try:
        before = rounds(d.url, images, range(4))
        owners = {seq: set(r) for seq, r in before.replicas.items()}
        assert all(len(o) == 1 for o in owners.values()), owners  # affinity
        used = {next(iter(o)) for o in owners.values()}
        assert len(used) == 2, "both replicas serve sequences"
        for seq in SEQUENCES:
            assert_same(before.logits[seq], single[1].logits[seq][:4], f"sequence {seq}")
        assert check(d.url)  # grpc.health.v1 through the proxy
        assert_streams_keep_affinity(d.url, images)
        text = _scrape(d.metrics)
        assert all(f'replica="{r}"' in text for r in used) and "ttaserve_requests_total" in text

        victim = sorted(used)[0]
        kill_replica(d, victim)
        after = rounds(d.url, images, range(4, 8), Run())
        for seq in SEQUENCES:  # write-through: nothing lost, whether the sequence moved or not
            assert_same(after.logits[seq], single[1].logits[seq][4:8], f"sequence {seq} after the kill")
        moved = {seq for seq in SEQUENCES if set(after.replicas[seq]) != owners[seq]}
        assert {seq for seq in SEQUENCES if owners[seq] == {victim}} <= moved
    finally:
        stop(d)


def test_periodic_snapshots_lose_at_most_the_interval(tmp_path: Path, images: np.ndarray,
                                                      single: tuple[str, Run]) -> None:
    interval = 1.0
    redis_proc, redis_url = start_redis(tmp_path)
    d = start_ray_serve(tmp_path, redis_url, interval=interval)
    try:
        before = rounds(d.url, images, range(5))
        owners = {seq: before.replicas[seq][0] for seq in SEQUENCES}
        assert all(set(r) == {owners[s]} for s, r in before.replicas.items())
        victim = sorted(set(owners.values()))[0]
        killed_at = time.monotonic()
        kill_replica(d, victim)
        kept = snapshot_batches(redis_url)  # what the store holds for each sequence now
        after = rounds(d.url, images, range(5, 8), Run())
        ref_url, ref = single
        client = grpcclient.InferenceServerClient(ref_url)
        moved = {seq for seq in SEQUENCES if set(after.replicas[seq]) != {owners[seq]}}
        assert {seq for seq in SEQUENCES if owners[seq] == victim} <= moved
        for seq in SEQUENCES:
            if seq not in moved:  # untouched by the failure
                assert_same(after.logits[seq], ref.logits[seq][5:8], f"sequence {seq} (not moved)")
                continue
            k = kept[seq]
            written_by = [t for t in before.sent_at[seq] if t < killed_at - interval - 1.0]
            assert k >= len(written_by), f"sequence {seq} lost more than {interval} s: kept {k} of 5 batches"
            # The reference replays the kept prefix, then the post-kill batches, on a fresh id.
            replay = Run()
            for step in [*range(k), *range(5, 8)]:
                send(client, replay, seq, batch_of(images, seq, step), sid=1000 + seq)
            assert_same(after.logits[seq], replay.logits[seq][k:], f"sequence {seq} resumed from batch {k}")
        client.close()
    finally:
        stop(d)
        redis_proc.terminate()
        redis_proc.wait(10)


def assert_streams_keep_affinity(url: str, images: np.ndarray) -> None:
    """A bidirectional stream through the proxy: each message reaches its sequence's owner."""
    client = grpcclient.InferenceServerClient(url)
    ids = range(101, 109)
    owners = {}
    for seq in ids:
        result = client.infer("demo", [infer_input(batch_of(images, seq, 0))], sequence_id=seq)
        owners[seq] = result.get_response().parameters["ttaserve_replica"].string_param
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(lambda result, error: answers.put((result, error)))
    for seq in ids:
        client.async_stream_infer("demo", [infer_input(batch_of(images, seq, 1))], sequence_id=seq)
    streamed = [answers.get(timeout=60) for _ in ids]
    client.stop_stream()
    client.close()
    assert all(error is None for _, error in streamed), streamed
    got = [r.get_response().parameters["ttaserve_replica"].string_param for r, _ in streamed]
    assert got == [owners[seq] for seq in ids]


def snapshot_batches(store_url: str) -> dict[int, int]:
    store = open_store(store_url)
    kept = {}
    for seq in SEQUENCES:
        record = store.read(f"demo/{file_name(SessionKey('anonymous', seq))}")
        snapshot = None if record is None else decode_file(SECRET.encode(), record.data)[2]
        kept[seq] = 0 if snapshot is None else int(decode(snapshot)[0]["batches"])
    store.close()
    return kept


def _scrape(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())
