"""Memory stays bounded under the attacks of issue 11 (defects 2, 3, 4), measured as the RSS
of a real `ttaserve serve` process on loopback. Bounds are generous against noise; the
numbers before and after the fix are in docs/BENCHMARKS.md "Resource bounds"."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.security.attacks import long_sequence_ids, session_flood, unauthenticated_bodies
from tests.security.conftest import rss_mib, write_tokens
from tests.server.conftest import start_process


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[subprocess.Popen, str, str]]:
    args = getattr(request, "param", ())
    proc, url, metrics = start_process("--auth-token-file", str(write_tokens(tmp_path)), "--torch-threads", "1", *args)
    try:
        yield proc, url, metrics
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _settle(pid: int) -> float:
    time.sleep(0.5)
    return rss_mib(pid)


def test_unauthenticated_bodies_are_never_read(server: tuple) -> None:
    proc, url, _ = server
    before = _settle(proc.pid)
    started = time.monotonic()
    codes = unauthenticated_bodies(url, count=16, size=60 << 20)
    assert codes == {"UNAUTHENTICATED": 16}
    assert time.monotonic() - started < 60
    grown = _settle(proc.pid) - before
    assert grown < 32, f"RSS grew by {grown:.0f} MiB for 16 refused 60 MB requests (was ~1.6 GiB)"


def test_long_sequence_ids_are_refused_without_keeping_memory(server: tuple) -> None:
    proc, url, metrics = server
    before = _settle(proc.pid)
    codes = long_sequence_ids(url, "alice-token", count=300, size=1 << 20)
    assert codes == {"INVALID_ARGUMENT": 300}
    grown = _settle(proc.pid) - before
    assert grown < 100, f"RSS grew by {grown:.0f} MiB (was +315 MiB)"
    page = urllib.request.urlopen(metrics, timeout=10).read().decode()
    assert 'ttaserve_live_sessions{model="demo"} 0.0' in page or "ttaserve_live_sessions{" not in page


@pytest.mark.parametrize("server", [("--max-session-memory", "32MiB")], indirect=True)
def test_session_memory_budget_bounds_a_flood_of_large_sessions(server: tuple) -> None:
    proc, url, metrics = server
    before = _settle(proc.pid)
    codes = session_flood(url, "alice-token", count=250)  # 250 x 400 KiB = 98 MiB without a budget
    assert codes == {"OK": 250}
    grown = _settle(proc.pid) - before
    page = urllib.request.urlopen(metrics, timeout=10).read().decode()
    held = float(re.search(r'ttaserve_session_state_bytes\{model="demo"\} (\S+)', page).group(1))  # type: ignore[union-attr]
    evicted = float(re.search(r'ttaserve_session_memory_evictions_total\{model="demo"\} (\S+)', page).group(1))  # type: ignore[union-attr]
    assert held <= 32 << 20 and evicted >= 160
    assert grown < 32 + 64, f"RSS grew by {grown:.0f} MiB with a 32 MiB budget"


def test_refused_calls_leave_nothing_behind(tmp_path: Path) -> None:
    """Every kind of refusal (no token, bad token, wrong scope, malformed request, unknown
    model, control error) frees its RPC: grpc's per-call state objects do not accumulate."""
    import gc

    import grpc

    from tests.security.attacks import MODEL_INFER, _request
    from tests.server.conftest import running_server

    def live_calls() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o).__name__ == "RPCState")

    with running_server(auth_token_file=str(write_tokens(tmp_path))) as handle, \
            grpc.insecure_channel(handle.url) as channel:
        infer = channel.unary_unary(MODEL_INFER)
        reset = channel.unary_unary("/ttaserve.v1.AdaptationService/ResetSession")
        cases = [(infer, _request(), ()), (infer, _request(), (("authorization", "Bearer nope"),)),
                 (infer, _request("x" * 300), (("authorization", "Bearer alice-token"),)),
                 (infer, b"\xff\xfe not protobuf", (("authorization", "Bearer alice-token"),)),
                 (reset, b"", (("authorization", "Bearer alice-token"),)),
                 (reset, b"\x0a\x04nope", (("authorization", "Bearer admin-token"),))]

        def refuse_all(rounds: int) -> None:
            for _ in range(rounds):
                for call, body, metadata in cases:
                    with pytest.raises(grpc.RpcError):
                        call(body, metadata=metadata, timeout=30)
        refuse_all(5)
        baseline = live_calls()
        refuse_all(40)  # 240 refused calls
        assert live_calls() <= baseline + 2
