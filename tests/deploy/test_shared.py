"""Replicas sharing one snapshot store: a sequence that moves resumes exactly where the
store says, stale copies are never used or written back, ends and crashes behave.

Each "replica" is an Engine with its own SharedSessions on the same store (and the same
secret), driven the way a served model drives it (before_request, predict, after_request),
with the session keys the server makes (server/keys.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny
from ttaserve import Engine
from ttaserve.deploy.shared import SharedSessions
from ttaserve.deploy.stores import DirectoryStore, SnapshotStore, open_store
from ttaserve.server.keys import SessionKey
from ttaserve.sessions import SessionLimits

POLICY = "tent"  # a policy whose state changes with every batch
SECRET = b"s" * 32  # every replica of a deployment signs and verifies with the same secret


def key(seq: int | str) -> SessionKey:
    return SessionKey("anonymous", seq)


class Replica:
    def __init__(self, store: SnapshotStore, interval_s: float = 0.0, idle_s: float = 600.0) -> None:
        self.engine = Engine(make_tiny(), policy=POLICY, limits=SessionLimits(idle_timeout_s=idle_s),
                             on_drop=lambda s, r: self.shared.dropped(s, r))
        self.shared = SharedSessions(store, "tiny", self.engine, interval_s=interval_s, secret=SECRET)

    def infer(self, seq: int | str, x: torch.Tensor, start: bool = False, end: bool = False) -> torch.Tensor:
        self.shared.before_request(key(seq), start)
        out = self.engine.predict(x, key(seq), start=start, end=end)
        self.shared.after_request(key(seq))
        return out


def batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(8, 1, 8, 8, generator=g) for _ in range(n)]


def reference(xs: list[torch.Tensor], seq: int = 1) -> list[torch.Tensor]:
    engine = Engine(make_tiny(), policy=POLICY)
    return [engine.predict(x, seq) for x in xs]


@pytest.fixture(params=["directory", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> SnapshotStore:
    if request.param == "directory":
        return DirectoryStore(tmp_path)
    s = open_store(request.getfixturevalue("redis_url"))
    s.client.flushdb()  # type: ignore[attr-defined]
    return s


def test_a_moved_sequence_continues_bit_for_bit(store: SnapshotStore) -> None:
    a, b = Replica(store), Replica(store)
    xs = batches(6)
    expected = reference(xs)
    got = [a.infer(1, x) for x in xs[:3]] + [b.infer(1, x) for x in xs[3:5]] + [a.infer(1, xs[5])]
    for g, e in zip(got, expected):
        assert torch.equal(g, e)  # A's stale copy was replaced by B's newer record


def test_end_elsewhere_releases_the_stale_copy(store: SnapshotStore) -> None:
    a, b = Replica(store), Replica(store)
    xs = batches(4)
    a.infer(1, xs[0])
    a.infer(1, xs[1])
    b.infer(1, xs[2], end=True)
    assert store.keys() == []
    fresh = reference([xs[3]])[0]
    assert torch.equal(a.infer(1, xs[3]), fresh)  # A starts fresh, not from its old copy


def test_periodic_mode_loses_at_most_the_unwritten_batches(store: SnapshotStore) -> None:
    a, b = Replica(store, interval_s=30), Replica(store, interval_s=30)
    xs = batches(6)
    for x in xs[:3]:
        a.infer(1, x)
    assert a.shared.flush() == 1
    for x in xs[3:5]:
        a.infer(1, x)  # not written: lost when A dies now
    expected = reference(xs[:3] + [xs[5]])
    assert torch.equal(b.infer(1, xs[5]), expected[-1])


def test_a_stale_copy_is_never_written_back(store: SnapshotStore) -> None:
    a, b = Replica(store, interval_s=30), Replica(store, interval_s=30)
    xs = batches(4)
    a.infer(1, xs[0])
    a.shared.flush()
    b.infer(1, xs[1])
    b.shared.flush()  # B now owns the record
    a.engine.predict(xs[2], key(1))  # a request that reached A without the check (e.g. in flight)
    assert a.shared.flush() == 0  # compare-and-set refuses; A drops its copy
    assert a.engine.sessions.get(key(1)) is None
    expected = reference([xs[0], xs[1], xs[3]])[-1]
    assert torch.equal(b.infer(1, xs[3]), expected)


def test_idle_expiry_does_not_delete_a_newer_record(store: SnapshotStore) -> None:
    a, b = Replica(store, idle_s=0.0), Replica(store)
    xs = batches(2)
    a.infer(1, xs[0])
    b.infer(1, xs[1])
    a.engine.sessions.expire_idle(now=1e12)
    assert len(store.keys()) == 1  # B's record survives A's expiry of its stale copy
    b.engine.sessions.expire_idle(now=1e12)
    assert len(b.engine.sessions) == 0


def test_sequence_start_resets_even_a_moved_sequence(store: SnapshotStore) -> None:
    a, b = Replica(store), Replica(store)
    xs = batches(3)
    a.infer(1, xs[0])
    b.infer(1, xs[1])
    out = a.infer(1, xs[2], start=True)
    assert torch.equal(out, reference([xs[2]])[0])
    assert torch.equal(b.infer(1, xs[0]), reference([xs[2], xs[0]])[-1])  # B follows A's restart


def test_a_corrupt_record_starts_fresh_and_is_removed(store: SnapshotStore) -> None:
    a = Replica(store)
    x = batches(1)[0]
    store.write(a.shared.key(key(1)), b"TTSF garbage")
    assert torch.equal(a.infer(1, x), reference([x])[0])
    assert store.read(a.shared.key(key(1))) is not None  # rewritten by the fresh session
    assert a.engine.sessions.get(key(1)).batches == 1  # type: ignore[union-attr]


def test_string_and_int_ids_are_different_records(store: SnapshotStore) -> None:
    a = Replica(store)
    xs = batches(2)
    a.infer(5, xs[0])
    a.infer("5", xs[1])
    assert len(store.keys("tiny/")) == 2


def test_a_stateless_session_is_written_when_it_starts_not_per_request(store: SnapshotStore) -> None:
    engine = Engine(make_tiny(), policy="tent", on_drop=lambda s, r: shared.dropped(s, r))
    shared = SharedSessions(store, "tiny", engine, secret=SECRET)
    x = batches(1)[0]
    shared.before_request(key(1), False)
    engine.predict(x, key(1), policy="alpha-bn")
    shared.after_request(key(1))
    token = store.token(shared.key(key(1)))
    for _ in range(3):
        shared.before_request(key(1), False)
        engine.predict(x, key(1))
        shared.after_request(key(1))
    assert store.token(shared.key(key(1))) == token  # nothing new to write
    other = Replica(store)
    other.shared.before_request(key(1), False)
    assert other.engine.sessions.get(key(1)).policy == "alpha-bn"  # type: ignore[union-attr]


def test_a_record_signed_with_another_secret_is_refused(store: SnapshotStore) -> None:
    """Whoever can write the store can delete sessions, not forge them."""
    a, stranger = Replica(store), Replica(store)
    stranger.shared.secret = b"t" * 32
    xs = batches(2)
    stranger.infer(1, xs[0])  # a record under another secret
    assert torch.equal(a.infer(1, xs[1]), reference([xs[1]])[0])  # refused: A starts fresh
