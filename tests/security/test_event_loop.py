"""Control RPCs never run engine work on the asyncio event loop (issue 11): while a tent
step holds its session's lock and a ResetSession of that session waits for it, the event
loop still answers ListSessions, GetPolicy and ServerLive at once."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import grpc

from tests.security.conftest import slow_repository
from tests.security.models import SLOW_FORWARD_S
from tests.server.conftest import images, infer_input, running_server
from ttaserve.client import ControlClient


def _timed(call) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def test_list_sessions_answers_while_a_tent_step_holds_its_session(tmp_path: Path) -> None:
    with running_server(model_repository=str(slow_repository(tmp_path)), demo=False, policy="tent") as handle:
        client, control = handle.client(), ControlClient(handle.url)
        client.infer("slow", [infer_input(images(4))], sequence_id=1)  # the session exists
        session = handle.session(1, model="slow")
        steps = threading.Thread(target=lambda: [client.infer("slow", [infer_input(images(4, s))], sequence_id=1)
                                                 for s in range(3)])
        steps.start()
        deadline = time.monotonic() + 10
        while not session.lock.locked():
            assert time.monotonic() < deadline
            time.sleep(0.005)
        reset = threading.Thread(target=lambda: control.reset("slow", 1))  # waits for the lock
        reset.start()
        time.sleep(0.05)
        assert session.lock.locked() and reset.is_alive()
        latencies = []
        for _ in range(5):
            latencies.append(_timed(lambda: control.list_sessions("slow")))
            latencies.append(_timed(lambda: control.get_policy("slow", 1)))
            latencies.append(_timed(client.is_server_live))
        assert session.lock.locked() or reset.is_alive()  # the probes overlapped the held lock
        steps.join(30)
        reset.join(30)
        assert statistics.median(latencies) < 0.1, latencies
        assert max(latencies) < SLOW_FORWARD_S / 2, latencies  # never waited for the forward
        assert session.resets["operator"] == 1


def test_a_heavy_set_policy_does_not_stall_other_rpcs() -> None:
    with running_server() as handle:
        control = ControlClient(handle.url)
        done = threading.Event()

        def switch() -> None:
            for i in range(20):  # K=1024 builds 8x the default state, off the event loop
                control.set_policy("demo", "unmix-tns", {"K": 1024}, sequence=1000 + i)
            done.set()
        worker = threading.Thread(target=switch)
        worker.start()
        latencies = []
        while not done.is_set():
            latencies.append(_timed(handle.client().is_server_live))
        worker.join(60)
        assert latencies and statistics.median(latencies) < 0.1, latencies
        assert handle.session(1019).policy == "unmix-tns"
        with grpc.insecure_channel(handle.url):
            pass
