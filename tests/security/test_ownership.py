"""Sessions belong to the principal that created them (issue 11, defect 1).

alice and bob hold inference tokens, ops an admin token. Whatever bob sends, alice's
sessions keep their state bit for bit; bob's reads never show alice's ids; only ops sees
and acts on every principal's sessions."""

from __future__ import annotations

import queue
import urllib.request

import grpc
import numpy as np
import pytest
import torch

from tests.security.conftest import code_of, control, headers, infer
from tests.server.conftest import Handle, images, infer_input
from tests.server.test_dashboard import http
from ttaserve.server.keys import SessionKey
from ttaserve.server.state_files import file_name


def _state(handle: Handle, owner: str, sequence_id: int | str) -> dict[str, torch.Tensor]:
    session = handle.session(sequence_id, owner)
    assert session is not None, f"{owner} has no session {sequence_id!r}"
    return {k: v.clone() for k, v in session.state.items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_another_principal_can_neither_read_adapt_reset_switch_nor_end(secured: Handle) -> None:
    infer(secured, "alice-token", 42, seed=1, parameters={"tta_policy": "unmix-tns"})
    infer(secured, "alice-token", 42, seed=2)
    before, batches = _state(secured, "alice", 42), secured.session(42, "alice").batches
    fresh = infer(secured, "admin-token", 4242, seed=3, parameters={"tta_policy": "alpha-bn"})
    # bob's id 42 is bob's own session: a fresh one under the default policy
    assert np.array_equal(infer(secured, "bob-token", 42, seed=3), fresh)
    infer(secured, "bob-token", 42, seed=4, sequence_start=True, parameters={"tta_policy": "tent"})
    infer(secured, "bob-token", 42, seed=5, sequence_end=True)
    alice = secured.session(42, "alice")
    assert alice.policy == "unmix-tns" and alice.batches == batches and _same(_state(secured, "alice", 42), before)
    for call in ("reset", "snapshot"):  # control changes need an admin token
        assert code_of(lambda c=call: getattr(control(secured, "bob-token"), c)("demo", 42, "alice")) \
            == grpc.StatusCode.PERMISSION_DENIED
    for read in ("describe",):  # reads are allowed on your own, refused on another's
        assert code_of(lambda r=read: getattr(control(secured, "bob-token"), r)("demo", 42, "alice")) \
            == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: control(secured, "bob-token").get_policy("demo", 42, "alice")) \
        == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: control(secured, "bob-token").describe("demo", 42)) == grpc.StatusCode.NOT_FOUND
    assert _same(_state(secured, "alice", 42), before)
    # bob's sequence_end removes bob's state file, never alice's
    store = secured.server.repository.get("demo").state_store
    assert store is not None
    store.flush()
    alice_file = store.directory / file_name(SessionKey("alice", 42))
    assert alice_file.exists()
    infer(secured, "bob-token", 42, seed=6)
    infer(secured, "bob-token", 42, seed=6, sequence_end=True)
    assert alice_file.exists() and secured.session(42, "alice") is not None


def test_reads_show_only_your_own_sessions(secured: Handle) -> None:
    infer(secured, "alice-token", "alice-private-7f3a", seed=6)
    infer(secured, "bob-token", "bob-private-c0de", seed=7)
    alice = control(secured, "alice-token").list_sessions()
    assert {s.owner for s in alice.sessions} == {"alice"}
    assert "bob-private-c0de" not in {s.sequence_id.text for s in alice.sessions}
    assert code_of(lambda: control(secured, "alice-token").list_sessions(owner="bob")) \
        == grpc.StatusCode.PERMISSION_DENIED
    everyone = control(secured, "admin-token").list_sessions()
    assert {"alice", "bob"} <= {s.owner for s in everyone.sessions}
    assert {s.owner for s in control(secured, "admin-token").list_sessions(owner="bob").sessions} == {"bob"}
    # the dashboard JSON: a token is needed, and it shows the same
    for path in ("/api/sessions", "/api/summary"):
        assert http(secured, path)[0] == 401
        assert http(secured, path, headers={"Authorization": "Bearer nope"})[0] == 401
    status, body = http(secured, "/api/sessions?limit=1000", headers={"Authorization": "Bearer alice-token"})
    assert status == 200 and {r["owner"] for r in body["sessions"]} == {"alice"}
    assert body["total"] == len(body["sessions"])
    status, body = http(secured, "/api/sessions?limit=1000", headers={"Authorization": "Bearer admin-token"})
    assert {"alice", "bob"} <= {r["owner"] for r in body["sessions"]}
    metrics = urllib.request.urlopen(secured.metrics_url, timeout=10).read().decode()
    assert "private" not in metrics  # /metrics stays open: it never names a sequence


def test_admin_acts_on_a_named_owner_only(secured: Handle) -> None:
    infer(secured, "alice-token", 77, seed=8, parameters={"tta_policy": "unmix-tns"})
    ops = control(secured, "admin-token")
    assert code_of(lambda: ops.reset("demo", 77)) == grpc.StatusCode.NOT_FOUND  # ops's own namespace
    assert ops.reset("demo", 77, owner="alice").owner == "alice"
    assert secured.session(77, "alice").resets["operator"] == 1
    assert ops.set_policy("demo", "tent", sequence=77, owner="alice").owner == "alice"
    assert secured.session(77, "alice").policy == "tent"
    status, _ = http(secured, "/api/sessions/demo/77/reset?owner=alice", "POST",
                     headers={"Authorization": "Bearer admin-token"})
    assert status == 200 and secured.session(77, "alice").resets["operator"] == 1  # reset after the switch
    assert code_of(lambda: ops.reset("demo", 77, owner="no/such")) == grpc.StatusCode.INVALID_ARGUMENT


def test_stream_sessions_are_reachable_only_from_their_stream(secured: Handle) -> None:
    client = secured.client()
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)), headers=headers("alice-token"))
    try:
        for seed in range(2):
            client.async_stream_infer("demo", [infer_input(images(4, seed))])
        assert all(results.get(timeout=30)[1] is None for _ in range(2))
        (scoped,) = [s for s in secured.engine().sessions.live() if s.sequence_id.scoped]
        before = {k: v.clone() for k, v in scoped.state.items()}
        listed = [s for s in control(secured, "admin-token").list_sessions(owner="alice").sessions
                  if s.sequence_id.WhichOneof("kind") is None]
        assert len(listed) == 1 and listed[0].batches == 2  # visible to the admin, with no id
        # No id a client can send names it: not its key's text, not the reserved prefix.
        text = str(scoped.sequence_id)
        for candidate in (text, text.split("/", 1)[1], "_stream:" + text.rsplit(":", 1)[1]):
            try:
                infer(secured, "alice-token", candidate, seed=9)
            except Exception as exc:
                assert "reserved" in str(exc)
        assert scoped.batches == 2 and all(torch.equal(before[k], scoped.state[k]) for k in before)
    finally:
        client.stop_stream()


@pytest.mark.parametrize(("first", "second"), [
    (5, "5"),                      # int and text are different sequences (Triton's semantics)
    ("caf\u00e9", "cafe\u0301"),   # NFC and NFD: ids are compared byte for byte
    ("Cam", "cam"),                # no case folding
])
def test_ids_are_never_normalized_into_each_other(secured: Handle, first: object, second: object) -> None:
    infer(secured, "alice-token", first, seed=10, parameters={"tta_policy": "unmix-tns"})
    before = _state(secured, "alice", first)  # type: ignore[arg-type]
    infer(secured, "alice-token", second, seed=11, parameters={"tta_policy": "tent"})
    assert secured.session(first, "alice").policy == "unmix-tns"  # type: ignore[arg-type]
    assert _same(_state(secured, "alice", first), before)  # type: ignore[arg-type]


def test_a_principal_named_twice_keeps_its_sessions_across_token_rotation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.server.conftest import running_server

    path = tmp_path / "tokens"
    path.write_text("inference old-token name=cam\ninference new-token name=cam\n")
    with running_server(auth_token_file=str(path)) as handle:
        infer(handle, "old-token", 1, seed=1, parameters={"tta_policy": "unmix-tns"})
        infer(handle, "new-token", 1, seed=2)
        assert handle.session(1, "cam").batches == 2


@pytest.mark.parametrize("lines", [
    "inference a name=same\nadmin b name=same\n",   # one name for two scopes
    "inference a name=anonymous\n",                 # reserved names
    "inference a name=token-123\n",
    "inference a name=../x\n",
    "inference two words\n",                        # a token with a space
])
def test_confusing_token_files_are_refused(tmp_path, lines: str) -> None:  # type: ignore[no-untyped-def]
    from ttaserve.server.auth import Tokens

    path = tmp_path / "tokens"
    path.write_text(lines)
    with pytest.raises(ValueError):
        Tokens.load(str(path), environ={})
