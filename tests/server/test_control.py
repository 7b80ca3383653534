"""The control plane (ttaserve.v1.AdaptationService), its CLI, drift signals and auth."""

from __future__ import annotations

import json
import queue
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.server.conftest import Handle, images, infer_input, running_server
from ttaserve.adapters import DEFAULT_POLICY
from ttaserve.cli import main as cli
from ttaserve.client import ControlClient


@pytest.fixture(scope="module")
def control(served: Handle) -> ControlClient:
    return ControlClient(served.url)


def noisy(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(images(n, seed) + rng.normal(0, 0.5, (n, 1, 28, 28)), 0, 1).astype(np.float32)


def test_list_policies_with_schema(control: ControlClient) -> None:
    policies = {p.name: p for p in control.list_policies().policies}
    assert {"source", "alpha-bn", "tbn", "unmix-tns", "tent"} <= set(policies)
    alpha = {q.name: q for q in policies["alpha-bn"].parameters}["alpha"]
    assert alpha.type == "float" and json.loads(alpha.default_json) == 0.1
    assert {q.name: q for q in policies["tbn"].parameters}["alpha"].fixed


def test_model_default_policy_applies_to_new_sessions_only(served: Handle, control: ControlClient) -> None:
    client = served.client()
    x = infer_input(images(4))
    client.infer("demo", [x], sequence_id=501)
    info = control.set_policy("demo", "alpha-bn", {"alpha": 0.3})
    try:
        assert info.policy == "alpha-bn" and json.loads(info.params_json["alpha"]) == 0.3
        client.infer("demo", [x], sequence_id=502)
        assert served.session(502).params == {"alpha": 0.3}
        assert served.session(501).policy == DEFAULT_POLICY  # the server's default
        assert control.get_policy("demo").policy == "alpha-bn"
    finally:
        control.set_policy("demo", DEFAULT_POLICY)


def test_sequence_policy_switch_resets_that_session(served: Handle, control: ControlClient) -> None:
    client = served.client()
    for seed in range(3):
        client.infer("demo", [infer_input(noisy(8, seed))], sequence_id=601, parameters={"tta_policy": "tent"})
    assert served.session(601).batches == 3
    info = control.set_policy("demo", "unmix-tns", {"K": 4}, sequence=601)
    session = served.session(601)
    assert info.policy == "unmix-tns" and session.policy == "unmix-tns" and session.batches == 0
    assert control.get_policy("demo", 601).policy == "unmix-tns"


def test_sessions_list_describe_reset(served: Handle, control: ControlClient) -> None:
    client = served.client()
    for seed in range(3):
        client.infer("demo", [infer_input(noisy(8, seed))], sequence_id="cam-9",
                     parameters={"tta_policy": "unmix-tns"})
    listed = {(s.model, s.sequence_id.text): s for s in control.list_sessions("demo").sessions}
    info = listed[("demo", "cam-9")]
    assert info.policy == "unmix-tns" and info.batches == 3 and info.samples == 24
    assert info.drift_score > 0 and info.state_bytes > 0
    detail = control.describe("demo", "cam-9")
    assert {"entropy", "norm_divergence", "label_shift"} <= set(detail.signals)
    assert len(detail.layer_divergence) == 11
    engine = served.engine()
    fresh = served.session("cam-9").adapter.init_state(engine.model)
    control.reset("demo", "cam-9")
    state = served.session("cam-9").state
    assert all(torch.equal(state[k], fresh[k]) for k in fresh)
    assert control.describe("demo", "cam-9").resets_by_reason["operator"] == 1
    with pytest.raises(grpc.RpcError) as err:
        control.describe("demo", "no-such-session")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_drift_is_higher_on_shifted_data(served: Handle, control: ControlClient) -> None:
    client = served.client()
    for seed in range(3):
        client.infer("demo", [infer_input(images(16, seed) * 0.1 + 0.45)], sequence_id=701)  # low contrast
        client.infer("demo", [infer_input(_clean(16, seed))], sequence_id=702)
    shifted = control.describe("demo", 701).signals["norm_divergence"]
    clean = control.describe("demo", 702).signals["norm_divergence"]
    assert shifted > 3 * clean


def _clean(n: int, seed: int) -> np.ndarray:
    from ttaserve.data import load_split

    x, _ = load_split("test")
    return x[seed * n:(seed + 1) * n].numpy()


def test_snapshot_moves_a_session_between_replicas(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("a" * 64)
    stream = [noisy(8, s) for s in range(4)]
    with running_server(secret_file=str(secret)) as one, running_server(secret_file=str(secret)) as two:
        client = one.client()
        for x in stream[:3]:
            client.infer("demo", [infer_input(x)], sequence_id=801, parameters={"tta_policy": "unmix-tns"})
        data = ControlClient(one.url).snapshot("demo", 801)
        with pytest.raises(grpc.RpcError) as err:  # a replica with another secret refuses it
            with running_server() as stranger:
                ControlClient(stranger.url).restore("demo", 801, data)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--secret-file" in err.value.details()
        ControlClient(two.url).restore("demo", 801, data)
        moved = two.client().infer("demo", [infer_input(stream[3])], sequence_id=801)
        stayed = client.infer("demo", [infer_input(stream[3])], sequence_id=801)
    np.testing.assert_array_equal(moved.as_numpy("logits"), stayed.as_numpy("logits"))


def test_corrupt_snapshot_is_rejected_and_changes_nothing(served: Handle, control: ControlClient) -> None:
    client = served.client()
    client.infer("demo", [infer_input(noisy(8, 1))], sequence_id=901, parameters={"tta_policy": "unmix-tns"})
    data = bytearray(control.snapshot("demo", 901))
    before = served.session(901).state.state_dict()
    data[-5] ^= 0xFF
    with pytest.raises(grpc.RpcError) as err:
        control.restore("demo", 901, bytes(data))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "signature" in err.value.details()
    after = served.session(901).state
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cli_is_a_thin_client(served: Handle, capsys: pytest.CaptureFixture[str]) -> None:
    served.client().infer("demo", [infer_input(images(2))], sequence_id=1234)
    assert cli(["policy", "--url", served.url, "list"]) == 0
    assert "unmix-tns" in capsys.readouterr().out
    assert cli(["sessions", "--url", served.url, "--json", "list", "--model", "demo"]) == 0
    rows = json.loads(capsys.readouterr().out)["sessions"]
    assert any(r["sequence_id"] == {"number": "1234"} for r in rows)
    assert cli(["sessions", "--url", served.url, "show", "demo", "1234"]) == 0
    assert "norm_divergence" in capsys.readouterr().out
    assert cli(["sessions", "--url", served.url, "reset", "demo", "nope"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_shared_flags_after_the_subcommand(served: Handle, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["policy", "list", "--json", "--url", served.url]) == 0
    remote = capsys.readouterr().out
    assert cli(["policy", "list", "--local", "--json"]) == 0
    assert capsys.readouterr().out == remote  # the same table with or without a server
    try:
        assert cli(["policy", "set", "demo", "alpha-bn", "--param", "alpha=0.3", "--url", served.url, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["params_json"] == {"alpha": "0.3"}
    finally:
        assert cli(["policy", "set", "demo", "source", "--url", served.url]) == 0


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Handle:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text("inference infer-token\nadmin admin-token\n")
    with running_server(auth_token_file=str(path)) as handle:
        yield handle


def _client_with(handle: Handle, token: str | None) -> tuple:
    headers = {"authorization": f"Bearer {token}"} if token else None
    return handle.client(), headers


@pytest.mark.parametrize(("token", "code"), [(None, "UNAUTHENTICATED"), ("wrong", "UNAUTHENTICATED")])
def test_inference_needs_a_valid_token(secured: Handle, token: str | None, code: str) -> None:
    client, headers = _client_with(secured, token)
    with pytest.raises(InferenceServerException) as err:
        client.infer("demo", [infer_input(images(2))], headers=headers)
    assert code in str(err.value.status())
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)), headers=headers)
    try:
        client.async_stream_infer("demo", [infer_input(images(2))])
    except InferenceServerException:
        pass  # the refusal may already have closed the stream; it is reported to the callback
    _, error = results.get(timeout=30)
    client.stop_stream()
    assert error is not None and code in str(error)


def test_scopes(secured: Handle) -> None:
    client, headers = _client_with(secured, "infer-token")
    reply = client.infer("demo", [infer_input(images(2))], sequence_id=4242, headers=headers)
    assert reply.as_numpy("logits").shape == (2, 10)
    with pytest.raises(grpc.RpcError) as err:
        ControlClient(secured.url, "infer-token").reset("demo", 1)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert ControlClient(secured.url, "infer-token").list_sessions() is not None  # its own sessions
    with pytest.raises(grpc.RpcError) as err:
        ControlClient(secured.url).list_sessions()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    listed = ControlClient(secured.url, "admin-token").list_sessions("demo").sessions
    assert [(s.sequence_id.number, s.batches) for s in listed if s.sequence_id.number == 4242] == [(4242, 1)]
    admin, headers = _client_with(secured, "admin-token")
    assert admin.infer("demo", [infer_input(images(2))], headers=headers).as_numpy("logits").shape == (2, 10)


def test_probes_stay_open(secured: Handle) -> None:
    assert secured.client().is_server_live()
    with grpc.insecure_channel(secured.url) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
