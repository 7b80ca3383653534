"""The TorchServe bridge: ttaserve's handler inside TorchServe's worker.

The fast tests drive the handler with a stand-in for TorchServe's request context (the
real one needs TorchServe's Java frontend). The slow test builds an archive with
``ttaserve package-mar``, starts a real TorchServe (Java + its Python worker, from the
peers virtualenv that scripts/test-slow.sh installs), streams two sequences with
different policies over its HTTP API, and checks the predictions equal ttaserve's own
server's for the same inputs."""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.server.conftest import infer_input, running_server
from ttaserve import Engine
from ttaserve.handlers.torchserve import TorchServeHandler, handle
from ttaserve.models import demo

ROOT = Path(__file__).resolve().parents[2]
PEERS = Path(os.environ.get("PEERS_VENV", ROOT / ".venv-peers"))


class FakeContext:
    """TorchServe's Context, as far as the handler uses it (headers, sequence ids, status)."""

    def __init__(self, model_dir: Path, headers: list[dict[str, str]]) -> None:
        self.system_properties = {"model_dir": str(model_dir)}
        self.headers = headers
        self.status: dict[int, tuple[int, str]] = {}

    def get_all_request_header(self, idx: int) -> dict[str, str]:
        return self.headers[idx]

    def get_sequence_id(self, idx: int) -> str:
        return self.headers[idx].get("ts_request_sequence_id", "")

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.status[idx] = (code, phrase)


def _npy(x: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, x)
    return buffer.getvalue()


def _images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = 0.5 + 0.5 * (rng.random((n, 1, 28, 28), dtype=np.float32) - 0.5) + rng.normal(0, 0.25, (n, 1, 28, 28))
    return np.clip(x, 0, 1).astype(np.float32)


@pytest.fixture
def archive_dir(tmp_path: Path) -> Path:
    (tmp_path / "ttaserve.json").write_text(json.dumps({"model": None, "policy": "source"}))
    return tmp_path


def test_handler_runs_one_session_per_sequence(archive_dir: Path) -> None:
    headers = [{"ts_request_sequence_id": "a", "ts_request_sequence_start": "true", "tta_policy": "unmix-tns"},
               {"ts_request_sequence_id": "b", "TTA_POLICY": "tbn"}]
    assert handle(None, FakeContext(archive_dir, [])) is None  # TorchServe's initialization call
    handler = TorchServeHandler(archive_dir)
    references = {"a": Engine(demo(), "unmix-tns"), "b": Engine(demo(), "tbn")}
    for k in range(3):
        xs = [_images(4, 2 * k), _images(4, 2 * k + 1)]
        rows = [{"body": _npy(xs[0])}, {"body": {"data": xs[1].tolist()}}]  # .npy and JSON bodies
        out = handler.handle(rows, FakeContext(archive_dir, headers))
        for (sid, engine), x, got in zip(references.items(), xs, out):
            expected = engine.predict(torch.from_numpy(x), session=sid)
            np.testing.assert_allclose(np.asarray(got["logits"], dtype=np.float32), expected.numpy(), atol=1e-5)
            assert got["predictions"] == expected.argmax(1).tolist() and got["sequence_id"] == sid
        assert [o["policy"] for o in out] == ["unmix-tns", "alpha-bn"]  # canonical names, as the server's
        headers[0] = {**headers[0], "ts_request_sequence_start": "false"}
    handler.handle([{"body": _npy(_images(1, 9))}],
                   FakeContext(archive_dir, [{"ts_request_sequence_id": "a", "ts_request_sequence_end": "true"}]))
    assert handler.engine.sessions.get("a") is None and handler.engine.sessions.get("b") is not None


def test_handler_rejects_bad_requests_without_touching_state(archive_dir: Path) -> None:
    handler = TorchServeHandler(archive_dir)
    seq = {"ts_request_sequence_id": "s", "tta_policy": "unmix-tns"}
    handler.handle([{"body": _npy(_images(2, 0))}], FakeContext(archive_dir, [seq]))
    before = handler.engine.sessions.get("s").state.state_dict()
    bad = [({"body": _npy(np.full((2, 1, 28, 28), np.nan, np.float32))}, seq, 400, "NaN"),
           ({"body": _npy(_images(2, 1)[:, :, :20])}, seq, 400, "expected"),
           ({"body": b"not an image"}, seq, 400, "neither .npy"),
           ({"body": _npy(_images(2, 1))}, {**seq, "tta_adapt": "maybe"}, 400, "tta_adapt"),
           ({"body": _npy(_images(2, 1))}, {"ts_request_sequence_id": "t", "tta_policy": "nope"}, 400, "unknown policy")]
    context = FakeContext(archive_dir, [h for _, h, _, _ in bad])
    out = handler.handle([row for row, _, _, _ in bad], context)
    for i, (_, _, code, words) in enumerate(bad):
        assert context.status[i][0] == code and words in out[i]["error"]
    after = handler.engine.sessions.get("s").state
    assert all(torch.equal(before[k], v) for k, v in after.items())
    assert handler.engine.sessions.get("t") is None


def test_handler_serves_an_onnx_model_and_refuses_gradient_policies(tmp_path: Path, demo_onnx_repo: Path) -> None:
    shutil.copytree(demo_onnx_repo / "demo-onnx", tmp_path / "model")
    (tmp_path / "ttaserve.json").write_text(json.dumps({"model": "model", "policy": "tbn"}))
    handler = TorchServeHandler(tmp_path)
    x = _images(4, 3)
    headers = [{"ts_request_sequence_id": "x"}, {"ts_request_sequence_id": "y", "tta_policy": "tent"}]
    context = FakeContext(tmp_path, headers)
    ok, refused = handler.handle([{"body": _npy(x)}, {"body": _npy(x)}], context)
    expected = Engine(demo(), "tbn").predict(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(ok["logits"], dtype=np.float32), expected, atol=1e-4)
    assert context.status[1][0] == 501 and refused["code"] == "UNIMPLEMENTED"


# -- a real TorchServe ---------------------------------------------------------------------
def _free_port() -> int:
    from ttaserve.bench.peer_servers import free_port

    return free_port()


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not (PEERS / "bin" / "torchserve").exists() or shutil.which("java") is None:
        pytest.skip(f"needs TorchServe in {PEERS} and Java: run scripts/test-slow.sh, which installs them")
    import subprocess

    from ttaserve.bench.peer_servers import _stop
    from ttaserve.cli import main

    root = tmp_path_factory.mktemp("torchserve")
    store = root / "store"
    assert main(["package-mar", "--out", str(store / "demo.mar"), "--batch-size", "4",
                 "--archiver", str(PEERS / "bin" / "torch-model-archiver")]) == 0
    address = f"127.0.0.1:{_free_port()}"
    config = {"inference_address": f"http://{address}", "management_address": f"http://127.0.0.1:{_free_port()}",
              "metrics_address": f"http://127.0.0.1:{_free_port()}", "grpc_inference_port": _free_port(),
              "grpc_management_port": _free_port(), "disable_system_metrics": "true",
              "disable_token_authorization": "true", "python": str(PEERS / "bin" / "python"),
              "model_store": str(store), "load_models": "demo=demo.mar"}
    (root / "config.properties").write_text("".join(f"{k}={v}\n" for k, v in config.items()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{PEERS / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    with open(root / "torchserve.log", "w") as log:
        proc = subprocess.Popen([str(PEERS / "bin" / "torchserve"), "--start", "--foreground", "--ncs",
                                 "--ts-config", str(root / "config.properties")], cwd=root, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(address, proc, root / "torchserve.log")
        yield address
    finally:
        _stop(proc)


def _wait_ready(address: str, proc: Any, log: Path, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"TorchServe exited:\n{log.read_text()[-3000:]}")
        try:
            status, _ = _predict(address, _images(1, 0), {"ts_request_sequence_id": "probe"})
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(1.0)
    raise AssertionError(f"TorchServe not ready after {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def _predict(address: str, x: np.ndarray, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """POST /predictions/demo. http.client keeps header names as given: TorchServe looks its
    sequence headers up case-sensitively (urllib would send Ts_request_sequence_id)."""
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        connection.request("POST", "/predictions/demo", body=_npy(x),
                           headers={"Content-Type": "application/octet-stream", **headers})
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if response.status != 200:
        return response.status, {"error": body.decode(errors="replace")}
    return response.status, json.loads(body)


@pytest.mark.slow
def test_real_torchserve_matches_ttaserve_per_sequence(torchserve: str) -> None:
    policies = {"seq-unmix": "unmix-tns", "seq-tbn": "tbn"}
    streams = {sid: [_images(8, 10 * i + k) for k in range(4)] for i, sid in enumerate(policies)}
    got: dict[str, list[dict[str, Any]]] = {}

    def run(sid: str) -> None:  # the two sequences stream concurrently, as two clients would
        answers = []
        for k, x in enumerate(streams[sid]):
            headers = {"ts_request_sequence_id": sid, **({"tta_policy": policies[sid]} if k == 0 else {})}
            status, body = _predict(torchserve, x, headers)
            assert status == 200, body
            answers.append(body)
        got[sid] = answers

    threads = [threading.Thread(target=run, args=(sid,)) for sid in policies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert set(got) == set(policies)

    with running_server() as served:  # ttaserve's own server, stock tritonclient, same inputs
        client = served.client()
        for sid, policy in policies.items():
            for k, x in enumerate(streams[sid]):
                result = client.infer("demo", [infer_input(x)], sequence_id=sid,
                                      parameters={"tta_policy": policy} if k == 0 else {})
                ours = result.as_numpy("logits")
                theirs = np.asarray(got[sid][k]["logits"], dtype=np.float32)
                assert got[sid][k]["predictions"] == ours.argmax(1).tolist()
                assert got[sid][k]["policy"] == result.get_response().parameters["tta_policy"].string_param
                np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5)

    status, body = _predict(torchserve, _images(2, 99), {"ts_request_sequence_id": "bad", "tta_policy": "nope"})
    assert status == 400 and "unknown policy" in body["error"]
