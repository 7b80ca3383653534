"""End-to-end helpers: a client stream of real Fashion-MNIST images that can switch from
clean to corrupted data, headless Chromium, and free ports for external servers."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.server.conftest import infer_input
from ttaserve.data import load_split

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)


def clean_images(n: int = 2048) -> np.ndarray:
    x, _ = load_split("test")
    return x[:n].numpy()


def corrupted(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """Low contrast plus Gaussian noise: a strong covariate shift (drift score ~100x clean)."""
    noise = np.random.default_rng(seed).normal(0.0, 0.05, x.shape).astype(np.float32)
    return np.clip(0.5 + 0.15 * (x - 0.5) + noise, 0.0, 1.0).astype(np.float32)


class Stream(threading.Thread):
    """Sends batches of ``data`` on one sequence, one every ``pause_s``, until :meth:`stop`;
    assign ``data`` to switch what it sends."""

    def __init__(self, url: str, sequence: int | str, data: np.ndarray, batch: int = 32,
                 pause_s: float = 0.1) -> None:
        super().__init__(name=f"stream-{sequence}", daemon=True)
        self.url, self.sequence, self.data, self.batch, self.pause_s = url, sequence, data, batch, pause_s
        self.sent = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        client = grpcclient.InferenceServerClient(self.url)
        try:
            while not self._halt.is_set():
                start = (self.sent * self.batch) % (len(self.data) - self.batch)
                client.infer("demo", [infer_input(self.data[start:start + self.batch])], sequence_id=self.sequence)
                self.sent += 1
                self._halt.wait(self.pause_s)
        except BaseException as exc:  # surfaced by stop(): a silent stream would make the test lie
            self.error = exc
        finally:
            client.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(30)
        if self.error is not None:
            raise self.error


def require(binary: str, package: str) -> str:
    """The binary's path; a missing one fails (not skips) with the way to install it."""
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed: run scripts/test-slow.sh (or apt-get install -y {package})")
    return path


def chromium(user_data: Path, *args: str, budget_ms: int = 4000) -> str:
    """Run headless Chromium on a fresh profile; returns its stdout (e.g. --dump-dom)."""
    command = [require("chromium", "chromium"), *CHROMIUM_FLAGS, f"--user-data-dir={user_data}",
               f"--virtual-time-budget={budget_ms}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
from tests.server.conftest import served  # noqa: E402,F401  (module-scoped server fixture for e2e tests)
