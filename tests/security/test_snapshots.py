"""Snapshots are signed (issue 11, defect 8): any bytes that are not a snapshot this server
signed, and any signed snapshot whose content is malformed, get INVALID_ARGUMENT and
change nothing. Fuzzed with hypothesis (derandomized)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.security.conftest import SECRET, control, infer
from tests.server.conftest import Handle
from ttaserve import snapshot
from ttaserve.adapters import ModelError, PolicyError
from ttaserve.engine import Engine
from ttaserve.errors import InvalidInput
from ttaserve.server.control import _SNAPSHOT
from ttaserve.server.sealing import seal, unseal

KEY = SECRET.encode()
FUZZ = settings(max_examples=60, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def genuine(secured: Handle) -> bytes:
    infer(secured, "alice-token", 9001, seed=1, parameters={"tta_policy": "unmix-tns"})
    infer(secured, "alice-token", 9001, seed=2)
    return control(secured, "admin-token").snapshot("demo", 9001, owner="alice")


def _restore_code(handle: Handle, data: bytes, sequence_id: int = 9002) -> grpc.StatusCode:
    try:
        control(handle, "admin-token").restore("demo", sequence_id, data, owner="alice")
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _signed(meta: Any, tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    payload = save(tensors, metadata={"ttaserve": json.dumps(meta)})
    body = snapshot.MAGIC + bytes([snapshot.VERSION]) + hashlib.sha256(payload).digest() + payload
    return seal(KEY, *_SNAPSHOT, body)


@FUZZ
@given(data=st.data())
def test_mutated_snapshots_are_invalid_argument(secured: Handle, genuine: bytes, data: st.DataObject) -> None:
    blob = bytearray(genuine)
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if kind == "flip":
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "extend":
        blob += data.draw(st.binary(min_size=1, max_size=64))
    else:
        at = data.draw(st.integers(0, len(blob)))
        blob[at:at] = data.draw(st.binary(min_size=1, max_size=64))
    assert _restore_code(secured, bytes(blob)) == grpc.StatusCode.INVALID_ARGUMENT
    assert secured.session(9002, "alice") is None


@pytest.mark.parametrize("change", [
    lambda m: m.pop("policy"), lambda m: m.update(policy=7), lambda m: m.update(policy="nope"),
    lambda m: m.update(batches="x"), lambda m: m.update(batches=-1), lambda m: m.update(batches=2**70),
    lambda m: m.update(samples=1.5), lambda m: m.update(resets={"a": "b"}), lambda m: m.update(resets=[1]),
    lambda m: m.update(skipped={"x" * 500: 1}), lambda m: m.update(signals={"entropy": "high"}),
    lambda m: m.update(signals={f"s{i}": 1.0 for i in range(1000)}), lambda m: m.update(created="yesterday"),
    lambda m: m.update(created=float("inf")), lambda m: m.update(params=[1, 2]),
    lambda m: m.update(params={"K": [1]}), lambda m: m.update(params={"K": 10**7}),
    lambda m: m.update(params={"nope": 1}), lambda m: m.update(model="other-model"),
    lambda m: m.update(fallbacks=5), lambda m: m.update(fallbacks={"entropy": "abc"}),
    lambda m: m.clear(),
])
def test_signed_but_malformed_snapshots_are_invalid_argument(secured: Handle, genuine: bytes, change: Any) -> None:
    meta, tensors = snapshot.decode(unseal(KEY, *_SNAPSHOT, genuine, "snapshot"))
    change(meta)
    assert _restore_code(secured, _signed(meta, tensors)) == grpc.StatusCode.INVALID_ARGUMENT
    assert secured.session(9002, "alice") is None


def test_signed_snapshots_with_wrong_tensors_are_invalid_argument(secured: Handle, genuine: bytes) -> None:
    meta, tensors = snapshot.decode(unseal(KEY, *_SNAPSHOT, genuine, "snapshot"))
    # every kind of section (policy state, guard, safety net), each with a dtype no section
    # uses: the file's tensor order is not fixed, so the test names the tensors it breaks
    for name in (sorted(k for k in tensors if k.startswith(prefix))[0] for prefix in ("state.", "guard.", "safety.")):
        assert _restore_code(secured, _signed(meta, {**tensors, name: tensors[name].half()})) == grpc.StatusCode.INVALID_ARGUMENT
    name = sorted(tensors)[0]
    for bad in ({**tensors, "state.extra": torch.zeros(3)},
                {k: v for k, v in tensors.items() if k != name}, {**tensors, name: torch.zeros(3, 2, 1)}):
        assert _restore_code(secured, _signed(meta, bad)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _restore_code(secured, _signed("not an object", tensors)) == grpc.StatusCode.INVALID_ARGUMENT
    garbage = seal(KEY, *_SNAPSHOT, b"TTAS\x01" + b"\0" * 32 + b"not safetensors")
    assert _restore_code(secured, garbage) == grpc.StatusCode.INVALID_ARGUMENT


def test_bytes_signed_for_another_purpose_are_refused(secured: Handle, genuine: bytes) -> None:
    inner = unseal(KEY, *_SNAPSHOT, genuine, "snapshot")
    as_state_file = seal(KEY, b"state-file", *_SNAPSHOT[1:], inner)
    assert _restore_code(secured, as_state_file) == grpc.StatusCode.INVALID_ARGUMENT
    assert _restore_code(secured, genuine) == grpc.StatusCode.OK  # the genuine one restores


@FUZZ
@given(data=st.data())
def test_engine_restore_raises_only_invalid_input(data: st.DataObject) -> None:
    """Below the signature: whatever the (checksummed) bytes, restore raises InvalidInput
    (or a policy/model error, also INVALID_ARGUMENT), never anything that maps to INTERNAL."""
    engine = _engine()
    good = _good_snapshot(engine)
    meta, tensors = snapshot.decode(good)
    payload = bytearray(good[37:])
    at = data.draw(st.integers(0, len(payload) - 1))
    payload[at] ^= data.draw(st.integers(1, 255))
    resigned = good[:5] + hashlib.sha256(bytes(payload)).digest() + bytes(payload)
    try:
        engine.restore("x", resigned)
    except (InvalidInput, PolicyError, ModelError):
        pass


_CACHE: dict[str, Any] = {}


def _engine() -> Engine:
    if "engine" not in _CACHE:
        import ttaserve.models

        _CACHE["engine"] = Engine(ttaserve.models.demo(), "unmix-tns", K=4)
    return _CACHE["engine"]  # type: ignore[no-any-return]


def _good_snapshot(engine: Engine) -> bytes:
    if "snapshot" not in _CACHE:
        engine.predict(torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)), session="s")
        _CACHE["snapshot"] = engine.snapshot("s")
    return _CACHE["snapshot"]  # type: ignore[no-any-return]
