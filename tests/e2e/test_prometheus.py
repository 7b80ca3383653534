"""A real Prometheus scraping a real ttaserve on loopback: with PromQL, the drift score rises
when a stream switches from clean to corrupted data and falls after ResetSession."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from tests.e2e.conftest import Stream, clean_images, corrupted, free_port, require
from tests.server.conftest import Handle, infer_input, running_server
from ttaserve.client import ControlClient

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DRIFT = 'ttaserve_drift_score{model="demo",policy="alpha-bn"}'
pytestmark = pytest.mark.slow


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, promql: str) -> float | None:
        """The value of a one-element instant vector (None when empty)."""
        args = urllib.parse.urlencode({"query": promql})
        body = json.load(urllib.request.urlopen(f"{self.url}/api/v1/query?{args}", timeout=10))
        assert body["status"] == "success", body
        result = body["data"]["result"]
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def wait(self, promql: str, condition: Callable[[float], bool], timeout_s: float = 30) -> float:
        deadline = time.monotonic() + timeout_s
        value = None
        while value is None or not condition(value):
            assert time.monotonic() < deadline, f"{promql} = {value} after {timeout_s} s"
            time.sleep(0.5)
            value = self.query(promql)
        return value


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[Prometheus, Handle]]:
    """A Prometheus scraping a fresh ttaserve's metrics port every second."""
    binary = require("prometheus", "prometheus")
    with running_server(policy="alpha-bn") as handle:
        config = tmp_path / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "ttaserve", "metrics_path": "/metrics", "static_configs": [
                {"targets": [f"127.0.0.1:{handle.server.metrics_http.port}"]}]}],  # type: ignore[union-attr]
        }))
        port = free_port()
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"))
        try:
            _wait_ready(f"http://127.0.0.1:{port}", proc)
            yield Prometheus(f"http://127.0.0.1:{port}"), handle
        finally:
            proc.terminate()
            proc.wait(20)


def _wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, "prometheus exited; see prometheus.log in the test's tmp dir"
        try:
            if urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200:
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() < deadline, "prometheus did not become ready in 30 s"
        time.sleep(0.3)


def test_drift_rises_on_corrupted_data_and_falls_after_a_reset(prometheus: tuple[Prometheus, Handle]) -> None:
    prom, handle = prometheus
    clean = clean_images()
    # A second, clean session keeps the per-policy mean defined once camera-1 is reset.
    client = grpcclient.InferenceServerClient(handle.url)
    for i in range(5):
        client.infer("demo", [infer_input(clean[1000 + 32 * i:1032 + 32 * i])], sequence_id="reference")
    stream = Stream(handle.url, "camera-1", clean)
    stream.start()
    try:
        prom.wait('ttaserve_sessions{model="demo",policy="alpha-bn"}', lambda n: n == 2)
        clean_drift = prom.wait(DRIFT, lambda v: True)
        stream.data = corrupted(clean)
        risen = prom.wait(DRIFT, lambda v: v > 20 * clean_drift)
    finally:
        stream.stop()
    ControlClient(handle.url).reset("demo", "camera-1")
    fallen = prom.wait(DRIFT, lambda v: v < risen / 10)
    assert clean_drift < 0.05 and fallen < 3 * clean_drift
    assert prom.query('sum(ttaserve_session_resets_total{reason="operator"})') == 1
    assert prom.query(f"max_over_time({DRIFT}[5m])") >= risen
    assert prom.query('ttaserve_sessions{model="demo",policy="alpha-bn"}') == 1  # camera-1 awaits new data


def test_shipped_prometheus_config_is_valid() -> None:
    promtool = require("promtool", "prometheus")
    done = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
