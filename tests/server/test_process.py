"""The real command line: `ttaserve serve` as a separate process, metrics, reflection, SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
import tritonclient.grpc as grpcclient
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.server.conftest import images, infer_input, start_process


@pytest.fixture(scope="module")
def process() -> Iterator[tuple[subprocess.Popen, str, str]]:
    proc, url, metrics_url = start_process("--policy", "alpha-bn", "--param", "alpha=0.2", "--grace", "5")
    yield proc, url, metrics_url
    if proc.poll() is None:
        proc.kill()


def test_cli_server_serves_the_default_policy(process: tuple) -> None:
    _, url, _ = process
    client = grpcclient.InferenceServerClient(url)
    result = client.infer("demo", [infer_input(images(4))])
    assert result.as_numpy("logits").shape == (4, 10)
    assert result.get_response().parameters["tta_policy"].string_param == "alpha-bn"
    config = client.get_model_config("demo", as_json=True)["config"]
    assert config["parameters"]["tta_policy"]["string_value"] == "alpha-bn"


def test_metrics_endpoint(process: tuple) -> None:
    _, url, metrics_url = process
    grpcclient.InferenceServerClient(url).infer("demo", [infer_input(images(2))], sequence_id=3)
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    assert re.search(r'ttaserve_requests_total\{code="OK",model="demo",policy="alpha-bn"\} [1-9]', text)
    for name in ("ttaserve_request_duration_seconds_bucket", "ttaserve_compute_duration_seconds_bucket",
                 "ttaserve_batch_size_bucket", 'ttaserve_live_sessions{model="demo"}'):
        assert name in text


def test_reflection_lists_services(process: tuple) -> None:
    _, url, _ = process
    with grpc.insecure_channel(url) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request])))
        names = {s.name for s in response.list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")
        response = next(stub.ServerReflectionInfo(iter([request])))
        assert response.file_descriptor_response.file_descriptor_proto


def test_sigterm_shuts_down_cleanly(process: tuple) -> None:
    proc, _, _ = process
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert "server stopped" in proc.stdout.read()  # type: ignore[union-attr]
