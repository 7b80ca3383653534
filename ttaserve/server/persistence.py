"""Durable session state (``--state-dir``): live sessions survive restarts and crashes.

Layout: ``<state-dir>/<model>/<sha256 of the sequence id>.ttas``, one file per session::

    b"TTSF" | version (1 byte) | sha256 of the body (32 bytes) | body
    body = header length (4 bytes, little endian) | JSON {"sequence_id", "model"} | snapshot

The snapshot is :meth:`Engine.snapshot_of`'s bytes (policy, state, counters; itself
checksummed, see ttaserve/snapshot.py). Every write is atomic: a temporary file in the same
directory, ``fsync``, ``rename`` over the old file, ``fsync`` of the directory; a crash
leaves either the old or the new file, never a mix.

When files are written, and what happens to them:

- every ``--state-interval`` seconds: every live session changed since its last write;
- on eviction (beyond ``--max-sessions``): the evicted session is written, and revived
  from its file on the sequence's next request, so eviction loses nothing;
- on graceful shutdown (SIGTERM), after in-flight requests finished: every changed session;
- at start: every file is restored into a live session; a file that fails its checksum or
  cannot be restored is logged, counted (``ttaserve_state_files_total{outcome="corrupt"}``)
  and renamed to ``*.corrupt``; the server starts regardless.
- ``sequence_end`` and idle expiry remove the file. Both release the sequence (Triton's
  semantics): its id may be reused for a new, unrelated stream, which must start fresh
  rather than inherit a finished stream's state. The final state of an ended sequence is
  available from the ``SnapshotSession`` control call before it ends.

So after a crash (SIGKILL, power loss) a session comes back as of its last periodic write:
at most ``--state-interval`` seconds of adaptation are lost. Stream-scoped sessions
(requests without a sequence id on a stream) end with their stream and are never written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from ttaserve.engine import Engine
from ttaserve.server.metrics import ServerMetrics
from ttaserve.sessions import SequenceId, Session

log = logging.getLogger(__name__)

MAGIC = b"TTSF"
VERSION = 1
SUFFIX = ".ttas"
_HEADER = len(MAGIC) + 1 + 32
STREAM_PREFIX = "_stream:"  # ids of stream-scoped sessions (server/inference.py)


class CorruptStateFile(ValueError):
    """A state file that fails its checksum or cannot be parsed."""


def file_name(sequence_id: SequenceId) -> str:
    """The file of a sequence id; int 5 and string "5" are different sequences."""
    kind = "int" if isinstance(sequence_id, int) else "str"
    return hashlib.sha256(f"{kind}:{sequence_id}".encode()).hexdigest() + SUFFIX


def encode_file(model: str, sequence_id: SequenceId, snapshot: bytes) -> bytes:
    header = json.dumps({"model": model, "sequence_id": sequence_id}).encode()
    body = len(header).to_bytes(4, "little") + header + snapshot
    return MAGIC + bytes([VERSION]) + hashlib.sha256(body).digest() + body


def decode_file(data: bytes) -> tuple[str, SequenceId, bytes]:
    """(model, sequence id, snapshot bytes); raises CorruptStateFile."""
    if len(data) < _HEADER + 4 or not data.startswith(MAGIC):
        raise CorruptStateFile("not a ttaserve state file (bad magic or truncated)")
    if data[len(MAGIC)] != VERSION:
        raise CorruptStateFile(f"state file version {data[len(MAGIC)]} is not supported")
    body = data[_HEADER:]
    if hashlib.sha256(body).digest() != data[len(MAGIC) + 1:_HEADER]:
        raise CorruptStateFile("checksum mismatch: the file is corrupt or truncated")
    size = int.from_bytes(body[:4], "little")
    header = json.loads(body[4:4 + size])
    sequence_id = header["sequence_id"]
    if not isinstance(sequence_id, (int, str)) or isinstance(sequence_id, bool):
        raise CorruptStateFile(f"bad sequence id {sequence_id!r}")
    return str(header["model"]), sequence_id, body[4 + size:]


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old or the new content."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stamp(session: Session) -> tuple[Any, ...]:
    """Changes whenever the session's persisted content can have changed."""
    return (id(session), session.created, session.policy, session.batches,
            sum(session.resets.values()))


class SessionPersistence(Protocol):
    """What a served model asks of its persistence: this module's :class:`StateStore`
    (one server, ``--state-dir``) or ttaserve.deploy.shared (replicas sharing a store)."""

    def before_request(self, sequence_id: SequenceId, start: bool) -> None: ...

    def after_request(self, sequence_id: SequenceId | None) -> None: ...

    def dropped(self, session: Session, reason: str) -> None: ...

    def flush(self, reason: str = "periodic") -> int: ...


class StateStore:
    """The state files of one model's sessions."""

    def __init__(self, root: str | Path, model: str, engine: Engine,
                 metrics: ServerMetrics | None = None) -> None:
        self.model, self.engine, self.metrics = model, engine, metrics
        self.directory = Path(root) / model
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # order: this lock, then a session's lock
        self._written: dict[SequenceId, tuple[Any, ...]] = {}  # stamp at the last write
        self._on_disk: set[SequenceId] = set()

    # -- start ------------------------------------------------------------------------
    def restore_all(self) -> int:
        """Restore every state file into a live session; returns how many came back."""
        for stale in self.directory.glob(".*.tmp"):  # a write interrupted by a crash
            stale.unlink(missing_ok=True)
        restored = 0
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                sequence_id = self._restore_file(path)
            except Exception as exc:  # a bad file never stops the server
                self._set_aside(path, exc)
                continue
            restored += 1
            self._count("restored")
            log.debug("restored session %r of %s from %s", sequence_id, self.model, path.name)
        if restored:
            log.info("restored %d session(s) of model %s from %s", restored, self.model, self.directory)
        return restored

    def _restore_file(self, path: Path) -> SequenceId:
        model, sequence_id, snapshot = decode_file(path.read_bytes())
        if model != self.model or path.name != file_name(sequence_id):
            raise CorruptStateFile(f"file belongs to model {model!r}, sequence {sequence_id!r}")
        session = self.engine.restore(sequence_id, snapshot)
        with self._lock:
            self._written[sequence_id] = _stamp(session)
            self._on_disk.add(sequence_id)
        return sequence_id

    def _set_aside(self, path: Path, exc: Exception) -> None:
        log.error("state file %s of model %s is unusable (%s); moved aside as %s.corrupt",
                  path, self.model, exc, path.name)
        self._count("corrupt")
        try:
            path.replace(path.with_name(path.name + ".corrupt"))
        except OSError as err:
            log.error("cannot move %s aside: %s", path, err)

    # -- while serving ----------------------------------------------------------------
    def before_request(self, sequence_id: SequenceId, start: bool) -> None:
        if not start:
            self.revive(sequence_id)

    def after_request(self, sequence_id: SequenceId | None) -> None:
        """Nothing: one server writes every --state-interval, on eviction and at shutdown."""

    def revive(self, sequence_id: SequenceId) -> bool:
        """Bring an evicted session back from its file before its next request."""
        if sequence_id not in self._on_disk or self.engine.sessions.get(sequence_id) is not None:
            return False
        path = self.directory / file_name(sequence_id)
        try:
            self._restore_file(path)
        except FileNotFoundError:
            self._on_disk.discard(sequence_id)
            return False
        except Exception as exc:
            with self._lock:
                self._on_disk.discard(sequence_id)
            self._set_aside(path, exc)
            return False
        self._count("revived")
        return True

    def dropped(self, session: Session, reason: str) -> None:
        """SessionStore.on_drop: keep evicted sessions, forget released ones."""
        if _scoped(session.sequence_id):
            return
        if reason == "evicted":
            with self._lock:
                self._write(session, reason)
        else:  # "end", "idle": the sequence is released
            self.forget(session.sequence_id)

    def forget(self, sequence_id: SequenceId) -> None:
        with self._lock:
            self._written.pop(sequence_id, None)
            self._on_disk.discard(sequence_id)
            (self.directory / file_name(sequence_id)).unlink(missing_ok=True)

    def flush(self, reason: str = "periodic") -> int:
        """Write every live session changed since its last write; returns how many."""
        written = 0
        for session in self.engine.sessions.live():
            if _scoped(session.sequence_id) or self._written.get(session.sequence_id) == _stamp(session):
                continue
            with self._lock:
                # A session that left the store meanwhile was handled by dropped().
                if self.engine.sessions.get(session.sequence_id) is session:
                    self._write(session, reason)
                    written += 1
        return written

    def files(self) -> Iterator[Path]:
        return self.directory.glob(f"*{SUFFIX}")

    def _write(self, session: Session, reason: str) -> None:
        stamp = _stamp(session)  # taken before the snapshot: a later change is written next time
        data = encode_file(self.model, session.sequence_id, self.engine.snapshot_of(session))
        try:
            atomic_write(self.directory / file_name(session.sequence_id), data)
        except OSError as exc:  # a full disk must not fail inference; the next flush retries
            log.error("cannot persist session %r of %s: %s", session.sequence_id, self.model, exc)
            self._count("write_failed")
            return
        self._written[session.sequence_id] = stamp
        self._on_disk.add(session.sequence_id)
        if self.metrics is not None:
            self.metrics.state_writes.labels(self.model, reason).inc()

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.state_files.labels(self.model, outcome).inc()


def _scoped(sequence_id: SequenceId) -> bool:
    return isinstance(sequence_id, str) and sequence_id.startswith(STREAM_PREFIX)
