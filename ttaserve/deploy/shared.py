"""A replica's sessions kept in a store that every replica reaches (failover and moves).

The router sends every request of one sequence to the same replica, but the replica set
changes: a replica dies, Ray Serve starts a replacement, an operator scales up or down, and
consistent hashing then hands some sequences to another replica. This class makes that
safe, for one model of one replica:

- **before** each request of a sequence (``before_request``) it compares the store's token for the
  sequence with the token it last wrote or read. A sequence it does not hold, or holds
  stale (another replica wrote it since), is restored from the store; one whose record is
  gone (ended elsewhere) is dropped here and starts fresh.
- **after** each answered request (``after_request``; ``interval_s == 0``, the default of the Ray
  deployment) or every ``interval_s`` seconds (``flush``) the changed session is written
  with compare-and-set: if another replica wrote it meanwhile, this copy is stale and is
  dropped instead of overwriting the newer one.

So what a replica crash can lose is what was not yet written: nothing that was answered
with write-through, at most the last interval otherwise. The record is the state-file
format of ttaserve/server/state_files.py around ``Engine.snapshot`` bytes, signed with the
server secret: every replica needs the same one (``ttaserve ray-serve`` gives its replicas
one), and a record that was not written by a replica with it is refused and deleted.
Sessions are keyed by :class:`~ttaserve.server.keys.SessionKey` (owner and sequence id);
stream-scoped ones stay on their replica.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ttaserve.deploy.stores import ANY, SnapshotStore
from ttaserve.engine import Engine
from ttaserve.server.keys import SessionKey
from ttaserve.server.metrics import ServerMetrics
from ttaserve.server.state_files import CorruptStateFile, decode_file, encode_file, file_name
from ttaserve.sessions import SequenceId, Session

log = logging.getLogger(__name__)


def _stamp(session: Session) -> tuple[Any, ...]:
    """Changes whenever the session's adaptation can have changed. A session without state
    (source, alpha-bn, tbn) only needs its policy carried over, so its batch counter does
    not count: writing it after every request would cost a store write for nothing but
    counters and drift signals."""
    batches = session.batches if len(session.state) else None
    return (id(session), session.created, session.policy, batches, sum(session.resets.values()))


class SharedSessions:
    """One model's sessions on one replica, backed by a shared :class:`SnapshotStore`."""

    def __init__(self, store: SnapshotStore, model: str, engine: Engine,
                 metrics: ServerMetrics | None = None, interval_s: float = 0.0, secret: bytes = b"") -> None:
        self.store, self.model, self.engine, self.metrics = store, model, engine, metrics
        self.secret = secret
        self.write_through = interval_s <= 0
        self._lock = threading.RLock()  # order: this lock, then a session's lock
        self._tokens: dict[SequenceId, str] = {}  # token of the record we last wrote or read
        self._stamps: dict[SequenceId, tuple[Any, ...]] = {}  # session stamp at that time
        self._releasing: set[SequenceId] = set()  # dropped here, the record is not ours to delete

    def key(self, sequence_id: SequenceId) -> str:
        return f"{self.model}/{file_name(sequence_id)}"

    # -- before a request ---------------------------------------------------------------
    def before_request(self, sequence_id: SequenceId, start: bool) -> None:
        """Make the live session current with the store (``start``: the request resets it,
        so only take over the record's token, which the next write replaces)."""
        if _scoped(sequence_id):
            return
        if start:
            with self._lock:
                token = self.store.token(self.key(sequence_id))
                if token is not None:
                    self._tokens[sequence_id] = token
                else:
                    self._tokens.pop(sequence_id, None)
            return
        self.revive(sequence_id)

    def revive(self, sequence_id: SequenceId) -> bool:
        """Make the live session current with the store; True if it was restored."""
        with self._lock:
            token = self.store.token(self.key(sequence_id))
            live = self.engine.sessions.get(sequence_id) is not None
            known = self._tokens.get(sequence_id)
            if token == known and (live or token is None):
                return False  # ours and current, or a new sequence
            if token is None:  # ended elsewhere (or never written): our copy is not current
                self._release(sequence_id)
                return False
            return self._restore(sequence_id)

    def _restore(self, sequence_id: SequenceId) -> bool:
        record = self.store.read(self.key(sequence_id))
        if record is None:
            self._release(sequence_id)
            return False
        try:
            model, stored_id, snapshot = decode_file(self.secret, record.data)
            if model != self.model or stored_id != sequence_id:
                raise CorruptStateFile(f"record belongs to model {model!r}, sequence {stored_id!r}")
            session = self.engine.restore(sequence_id, snapshot)
        except Exception as exc:  # a bad record never fails the request: start fresh
            log.error("snapshot of sequence %r of %s is unusable (%s); deleted", sequence_id,
                      self.model, exc)
            self.store.delete(self.key(sequence_id), expect=record.token)
            self._release(sequence_id)
            self._count("corrupt")
            return False
        self._tokens[sequence_id] = record.token
        self._stamps[sequence_id] = _stamp(session)
        self._count("restored")
        return True

    def _release(self, sequence_id: SequenceId) -> None:
        """Forget our copy without touching the store."""
        self._tokens.pop(sequence_id, None)
        self._stamps.pop(sequence_id, None)
        self._releasing.add(sequence_id)
        try:
            self.engine.sessions.end(sequence_id)
        finally:
            self._releasing.discard(sequence_id)

    # -- after a request ----------------------------------------------------------------
    def after_request(self, sequence_id: SequenceId | None) -> None:
        """Write-through: persist the session a request just changed (before it is answered)."""
        if self.write_through and sequence_id is not None and not _scoped(sequence_id):
            session = self.engine.sessions.get(sequence_id)
            if session is not None:
                with self._lock:
                    self._write(session, "request")

    def flush(self, reason: str = "periodic") -> int:
        written = 0
        for session in self.engine.sessions.live():
            if not _scoped(session.sequence_id) and self._stamps.get(session.sequence_id) != _stamp(session):
                with self._lock:
                    if self.engine.sessions.get(session.sequence_id) is session:
                        written += self._write(session, reason)
        return written

    def _write(self, session: Session, reason: str) -> bool:
        sequence_id = session.sequence_id
        stamp = _stamp(session)
        if self._stamps.get(sequence_id) == stamp:
            return False
        assert isinstance(sequence_id, SessionKey)  # _scoped() let only server keys through
        data = encode_file(self.secret, self.model, sequence_id, self.engine.snapshot_of(session))
        try:
            token = self.store.write(self.key(sequence_id), data, expect=self._tokens.get(sequence_id))
        except Exception as exc:  # the store is down: inference goes on, the next write retries
            log.error("cannot write session %r of %s: %s", sequence_id, self.model, exc)
            self._count("write_failed")
            return False
        if token is None:  # another replica wrote it since we read it: ours is stale
            log.warning("sequence %r of %s moved to another replica; dropping the local copy",
                        sequence_id, self.model)
            self._count("conflict")
            self._release(sequence_id)
            return False
        self._tokens[sequence_id] = token
        self._stamps[sequence_id] = stamp
        if self.metrics is not None:
            self.metrics.state_writes.labels(self.model, reason).inc()
        return True

    # -- sessions leaving ---------------------------------------------------------------
    def dropped(self, session: Session, reason: str) -> None:
        """SessionStore.on_drop: keep evicted sessions, delete released ones we own."""
        sequence_id = session.sequence_id
        if _scoped(sequence_id) or sequence_id in self._releasing:
            return
        with self._lock:
            if reason == "evicted":
                self._write(session, reason)
            else:  # "end" releases the sequence; "idle" only if nobody wrote it since
                expect = ANY if reason == "end" else self._tokens.get(sequence_id)
                if expect is not None:
                    self.store.delete(self.key(sequence_id), expect=expect)
            if reason != "evicted":
                self._tokens.pop(sequence_id, None)
                self._stamps.pop(sequence_id, None)

    def restore_all(self) -> int:
        """Nothing up front: a replica restores a sequence when its first request arrives."""
        return 0

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.state_files.labels(self.model, outcome).inc()


def _scoped(sequence_id: SequenceId) -> bool:
    """Not to be shared: a stream-scoped session, or a key the server did not make."""
    return not isinstance(sequence_id, SessionKey) or sequence_id.scoped
