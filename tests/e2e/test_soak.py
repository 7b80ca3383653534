"""Soak: many concurrent streams of mixed policies on loopback, with a malformed message now
and then. No errors beyond the intended rejections, memory flat, p99 latency reported.

The long version (60 s, 64 streams, a separate server process) is marked slow; a few-second
version against an in-process server runs in the default suite."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.server.conftest import running_server
from ttaserve.adapters import policy_names

MALFORMED_EVERY = 25  # every 25th message of a stream is malformed on purpose


@dataclass
class SoakResult:
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)  # unexpected outcomes
    rejected: int = 0  # intended rejections (the malformed messages)

    def p(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")


def _request(stream: int, k: int, policy: str, batch: int) -> tuple[service_pb2.ModelInferRequest, bool]:
    malformed = k % MALFORMED_EVERY == MALFORMED_EVERY - 1
    x = np.random.default_rng(stream * 100_003 + k).random((batch, 1, 28, 28), dtype=np.float32)
    if malformed:
        x[0, 0, 0, 0] = np.nan
    request = service_pb2.ModelInferRequest(model_name="demo", id=f"{stream}-{k}")
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    request.parameters["sequence_id"].int64_param = 1_000_000 + stream
    request.parameters["tta_policy"].string_param = policy
    return request, malformed


async def _stream(url: str, stream: int, policy: str, until: float, batch: int, result: SoakResult) -> None:
    async with grpc.aio.insecure_channel(url) as channel:
        call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
        k = 0
        while time.monotonic() < until:
            request, malformed = _request(stream, k, policy, batch)
            started = time.perf_counter()
            await call.write(request)
            response = await call.read()
            elapsed = time.perf_counter() - started
            if response.error_message:
                if malformed and "NaN or Inf" in response.error_message:
                    result.rejected += 1
                else:
                    result.errors[response.error_message[:80]] += 1
            elif malformed:
                result.errors["malformed message accepted"] += 1
            else:
                result.latencies.append(elapsed)
            k += 1
        await call.done_writing()


def soak(url: str, seconds: float, streams: int, batch: int = 8) -> SoakResult:
    result = SoakResult()
    policies = policy_names()
    until = time.monotonic() + seconds

    async def run() -> None:
        await asyncio.gather(*(_stream(url, i, policies[i % len(policies)], until, batch, result)
                               for i in range(streams)))
    asyncio.run(run())
    return result


def _report(name: str, result: SoakResult, extra: str = "") -> None:
    print(f"\n{name}: {len(result.latencies)} responses, {result.rejected} intended rejections, "
          f"p50 {result.p(50) * 1e3:.1f} ms, p99 {result.p(99) * 1e3:.1f} ms{extra}")


def test_short_soak_in_process() -> None:
    with running_server(policy="alpha-bn") as handle:
        result = soak(handle.url, seconds=3.0, streams=8, batch=4)
        live = len(handle.engine().sessions)
    _report("short soak (3 s, 8 streams)", result)
    assert not result.errors, result.errors
    assert len(result.latencies) >= 8 and result.p(99) > 0
    assert live >= 8  # every stream's sequence is still live (nothing dropped)


def _rss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1))  # type: ignore[union-attr]


@pytest.mark.slow
def test_soak_60s_64_streams() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ttaserve", "serve", "--grpc-port", "0", "--metrics-port", "-1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = ""
        while not line.startswith("ttaserve ready"):
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line, "server did not start"
        url = re.search(r"gRPC (\S+)", line).group(1)  # type: ignore[union-attr]
        soak(url, seconds=10, streams=64)  # warm-up: sessions, artifacts, allocator pools
        before = _rss_kib(proc.pid)
        result = soak(url, seconds=60, streams=64)
        after = _rss_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    growth = (after - before) / 1024
    _report("soak (60 s, 64 streams)", result,
            f", RSS {before / 1024:.0f} -> {after / 1024:.0f} MiB ({growth:+.1f} MiB)")
    assert not result.errors, result.errors
    assert result.rejected > 0
    assert growth < 64, f"server memory grew by {growth:.1f} MiB during the soak"
