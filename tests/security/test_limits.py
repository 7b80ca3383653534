"""Limits with clear errors (issue 11, defects 2 and 8, and the small items of 9): sequence
ids, policy parameters everywhere they can be set, echoed input, mixed tensor contents."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.security.conftest import SECRET, code_of, control, infer, write_secret
from tests.server.conftest import Handle, images, running_server
from tests.server.test_dashboard import http
from ttaserve import snapshot
from ttaserve.handlers.loader import load_repository
from ttaserve.proto import control_pb2
from ttaserve.server.control import _SNAPSHOT
from ttaserve.server.keys import MAX_SEQUENCE_ID_BYTES
from ttaserve.server.sealing import seal, unseal


def _raw(handle: Handle, request: service_pb2.ModelInferRequest, token: str = "alice-token") -> grpc.RpcError | None:
    with grpc.insecure_channel(handle.url) as channel:
        try:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request, metadata=(("authorization", f"Bearer {token}"),), timeout=30)
        except grpc.RpcError as exc:
            return exc
    return None


def _request(sequence_id: object = 0, model: str = "demo") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=[2, 1, 28, 28])
    request.raw_input_contents.append(images(2).tobytes())
    if isinstance(sequence_id, str):
        request.parameters["sequence_id"].string_param = sequence_id
    elif sequence_id:
        request.parameters["sequence_id"].int64_param = sequence_id  # type: ignore[assignment]
    return request


@pytest.mark.parametrize(("sequence_id", "message"), [
    ("x" * (MAX_SEQUENCE_ID_BYTES + 1), "the limit is 256 bytes"),
    ("é" * 129, "258 bytes long"),                   # the limit counts UTF-8 bytes, not characters
    ("x" * (1 << 20), "the limit is 256 bytes"),     # the 1 MiB ids of the report
    ("cam\n7", "control characters"),
    ("cam\x00", "control characters"),
    ("_stream:0123abcd", "reserved"),
])
def test_bad_sequence_ids_are_refused_and_create_nothing(secured: Handle, sequence_id: str, message: str) -> None:
    before = len(secured.engine().sessions)
    error = _raw(secured, _request(sequence_id))
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details() and len(error.details()) < 1200
    assert len(secured.engine().sessions) == before


def test_longest_allowed_id_works(secured: Handle) -> None:
    assert _raw(secured, _request("é" * 128)) is None  # 256 bytes
    assert secured.session("é" * 128, "alice") is not None


def test_echoed_input_is_bounded(secured: Handle) -> None:
    """A 100 KB model name used to make the status exceed gRPC's metadata limit."""
    error = _raw(secured, _request(model="m" * 100_000))
    assert error is not None and error.code() == grpc.StatusCode.NOT_FOUND
    assert "unknown model" in error.details() and len(error.details()) < 1200
    request = _request()
    request.parameters["tta_" + "p" * 100_000].string_param = "x"
    error = _raw(secured, request)
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT and len(error.details()) < 1200
    request = _request(7)
    request.parameters["tta_policy"].string_param = "p" * 100_000
    error = _raw(secured, request)
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT and len(error.details()) < 1200


def test_raw_and_typed_contents_together_are_refused(secured: Handle) -> None:
    request = _request(8)
    request.inputs[0].contents.fp32_contents.extend([0.5] * (2 * 28 * 28))
    error = _raw(secured, request)
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "both contents and raw_input_contents" in error.details()
    assert secured.session(8, "alice") is None


def test_set_policy_bounds_answer_at_once(secured: Handle) -> None:
    ops = control(secured, "admin-token")
    for params in ({"K": 300_000}, {"K": 1e7}, {"tau": "NaN"}, {"K": [1, 2]}, {"K": None}):
        started = time.monotonic()
        raw = {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()}
        request = control_pb2.SetPolicyRequest(model="demo", policy="unmix-tns", params_json=raw)
        code = code_of(lambda r=request: ops._call("SetPolicy", r))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, params
        assert time.monotonic() - started < 2.0
    assert secured.engine().default.name == "alpha-bn"  # unchanged


def test_a_signed_snapshot_claiming_huge_parameters_is_refused(secured: Handle) -> None:
    infer(secured, "alice-token", 555, parameters={"tta_policy": "unmix-tns"})
    ops = control(secured, "admin-token")
    data = ops.snapshot("demo", 555, owner="alice")
    meta, tensors = snapshot.decode(unseal(SECRET.encode(), *_SNAPSHOT, data, "snapshot"))
    meta["params"]["K"] = 10_000_000
    forged = seal(SECRET.encode(), *_SNAPSHOT, snapshot.encode(meta, tensors))  # only the secret's holder can
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        ops.restore("demo", 556, forged, owner="alice")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "K must be in [1, 1024]" in err.value.details()
    assert time.monotonic() - started < 2.0 and secured.session(556, "alice") is None


def test_config_and_command_line_parameters_are_bounded(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    model.joinpath("config.json").write_text(json.dumps({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
        "factory": "ttaserve.models:demo", "policy": "unmix-tns", "params": {"K": 300000}}))
    load_repository(tmp_path)  # loading is fine: the policy is built when the model is served
    with pytest.raises(ValueError, match="K must be in"):
        with running_server(model_repository=str(tmp_path), demo=False):
            pass
    with pytest.raises(ValueError, match="steps must be in"):
        with running_server(policy="tent", policy_params={"steps": 10**6}):
            pass


@pytest.mark.parametrize(("query", "status"), [
    ("limit=%C2%B2", 400), ("limit=%D9%A3", 400), ("limit=-1", 400), ("limit=99999", 400), ("limit=1", 200),
])
def test_dashboard_limit_parsing(secured: Handle, query: str, status: int) -> None:
    code, body = http(secured, f"/api/sessions?{query}", headers={"Authorization": "Bearer admin-token"})
    assert code == status, body


@pytest.mark.parametrize(("sequence", "status"), [
    ("--5", 404), ("-", 404), ("%C2%B2", 404), ("%D9%A3", 404),  # text ids nobody has: not found, no 500
    ("1" * 30, 404), ("x" * 300, 400), ("%00", 400), ("_stream%3Aab", 400),
])
def test_dashboard_reset_paths_never_fail_with_500(secured: Handle, sequence: str, status: int) -> None:
    code, body = http(secured, f"/api/sessions/demo/{sequence}/reset", "POST",
                      headers={"Authorization": "Bearer admin-token"})
    assert code == status, body


def test_unicode_digits_stay_text(secured: Handle) -> None:
    infer(secured, "admin-token", "\u0663")   # '٣' is a text id, not the number 3
    infer(secured, "admin-token", 3)
    code, body = http(secured, "/api/sessions/demo/%D9%A3/reset", "POST", headers={"Authorization": "Bearer admin-token"})
    assert code == 200 and body["session"]["sequence_id"] == "\u0663"
    assert secured.session(3, "ops").resets["operator"] == 0
    code, body = http(secured, "/api/sessions/demo/3/reset?kind=text", "POST",
                      headers={"Authorization": "Bearer admin-token"})
    assert code == 404  # the text "3" is another sequence than the number 3


def test_secret_file_is_created_private(tmp_path: Path) -> None:
    with running_server(state_dir=str(tmp_path)):
        pass
    assert (tmp_path / ".secret").stat().st_mode & 0o777 == 0o600
    assert len((tmp_path / ".secret").read_bytes().strip()) >= 32
    short = tmp_path / "short"
    short.write_text("too short")
    with pytest.raises(ValueError, match="at least 32"):
        with running_server(secret_file=str(short)):
            pass
    assert write_secret(tmp_path).exists()
