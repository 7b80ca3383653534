"""Shutdown is truthful (issue 11, defect 6), with a real `ttaserve serve` process: a request
is applied if and only if it was answered OK (so every UNAVAILABLE may be retried), past
--grace nothing new is applied, and the process exits within the grace period plus one
forward pass."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import tritonclient.grpc as grpcclient

from tests.security.conftest import slow_repository
from tests.security.models import SLOW_FORWARD_S
from tests.server.conftest import images, infer_input, start_process
from ttaserve.client import ControlClient

GRACE_S = 1.0
QUEUED = 8  # requests of one sequence, each a >= 0.6 s forward on the one model worker


def _serve(tmp_path: Path) -> tuple:
    return start_process("--model-repository", str(slow_repository(tmp_path / "models")), "--no-demo",
                         "--policy", "tent", "--state-dir", str(tmp_path / "state"), "--state-interval", "600",
                         "--grace", str(GRACE_S), "--torch-threads", "1")


def test_a_request_is_applied_iff_answered_ok(tmp_path: Path) -> None:
    proc, url, _ = _serve(tmp_path)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def send(seed: int) -> None:
        try:
            grpcclient.InferenceServerClient(url).infer("slow", [infer_input(images(2, seed))], sequence_id="s",
                                                        client_timeout=60)
            code = "OK"
        except Exception as exc:  # tritonclient's InferenceServerException
            code = str(exc.status()).replace("StatusCode.", "")  # type: ignore[attr-defined]
        with lock:
            outcomes[code] += 1
    try:
        senders = [threading.Thread(target=send, args=(i,)) for i in range(QUEUED)]
        for thread in senders:
            thread.start()
        time.sleep(SLOW_FORWARD_S / 2)  # the first forward runs, the others queue
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.2)
        late = threading.Thread(target=send, args=(99,))  # arrives while draining
        late.start()
        code = proc.wait(timeout=60)
        exit_s = time.monotonic() - signalled
        for thread in [*senders, late]:
            thread.join(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0
    assert set(outcomes) <= {"OK", "UNAVAILABLE"} and sum(outcomes.values()) == QUEUED + 1, outcomes
    assert outcomes["UNAVAILABLE"] >= 2 and outcomes["OK"] >= 1, outcomes
    # From the signal to "server stopped": the grace period plus the one forward pass
    # running when it ended (a tent step: forward and backward), plus the final state write.
    stopping = _stop_seconds(proc.stdout.read())  # type: ignore[union-attr]
    assert stopping < GRACE_S + 2 * SLOW_FORWARD_S + 1.0, stopping
    assert exit_s < stopping + 10, exit_s  # then interpreter teardown (torch), not requests
    proc, url, _ = _serve(tmp_path)  # what was saved: exactly the OK-answered requests
    try:
        (session,) = ControlClient(url).list_sessions("slow").sessions
        assert session.batches == outcomes["OK"], (session.batches, outcomes)
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _stop_seconds(log: str) -> float:
    """Seconds between the server's "signal received" and "server stopped" log lines."""
    stamps = {}
    for line in log.splitlines():
        for event in ("signal received", "server stopped"):
            if event in line:
                stamps[event] = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return (stamps["server stopped"] - stamps["signal received"]).total_seconds()
