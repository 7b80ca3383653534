"""Durable session state (``--state-dir``): live sessions survive restarts and crashes.

File format and atomic writes: server/state_files.py (signed with the server secret).

When files are written, and what happens to them:

- every ``--state-interval`` seconds: every live session changed since its last write;
- on eviction (``--max-sessions``, ``--max-session-memory``): the evicted session is
  written (unless its file is already current), and revived from its file on the
  sequence's next request;
- on graceful shutdown (SIGTERM), after in-flight requests finished: every changed session;
- at start: files are restored oldest first (so the newest stay live when the caps evict);
  a file that fails its MAC, cannot be restored, is not a regular file (symlink, FIFO,
  device) or is larger than ``--state-max-file-bytes`` is logged, counted
  (``ttaserve_state_files_total{outcome="corrupt"}``) and renamed to ``*.corrupt``, never
  followed or read past its limit; the server starts regardless and never blocks on one.
- ``sequence_end`` and idle expiry remove the file: both release the sequence (Triton's
  semantics), and an id reused later must start fresh.

Disk is bounded: all state files together stay under ``--state-max-bytes`` (when a write
would pass it, the oldest files of sessions that are not live are deleted first, then the
write is skipped and counted ``over_budget``), one file under ``--state-max-file-bytes``,
and a file whose session is not live is deleted once older than ``--state-ttl``.

After a crash (SIGKILL, power loss) a session comes back as of its last periodic write.
Stream-scoped sessions end with their stream and are never written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ttaserve.engine import Engine
from ttaserve.server.disk_budget import DiskBudget
from ttaserve.server.keys import SessionKey
from ttaserve.server.metrics import ServerMetrics
from ttaserve.server.safe_files import read_regular
from ttaserve.server.state_files import (
    SUFFIX,
    CorruptStateFile,
    atomic_write,
    decode_file,
    encode_file,
    file_name,
)
from ttaserve.sessions import SequenceId, Session

log = logging.getLogger(__name__)

_MODEL_DIR = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class StateLimits:
    max_bytes: int = 1 << 30  # all state files of the server; 0: unbounded
    max_file_bytes: int = 64 << 20  # one file, read or written
    ttl_s: float = 86400.0  # files of sessions that are not live are deleted past this age; 0: never


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


def _key(session: Session) -> SessionKey | None:
    key = session.sequence_id
    return key if isinstance(key, SessionKey) and not key.scoped else None


class StateStore:
    """The state files of one model's sessions."""

    def __init__(self, root: str | Path, model: str, engine: Engine, metrics: ServerMetrics | None = None,
                 secret: bytes = b"", limits: StateLimits = StateLimits(), budget: DiskBudget | None = None) -> None:
        if not _MODEL_DIR.fullmatch(model):
            raise ValueError(f"model name {model!r} cannot be a state directory name")
        self.model, self.engine, self.metrics, self.secret = model, engine, metrics, secret
        self.limits = limits
        self.budget = budget or DiskBudget(limits.max_bytes)
        self.directory = _own_directory(Path(root), model)
        self._lock = threading.Lock()  # order: this lock, then a session's lock
        self._written: dict[SessionKey, tuple[Any, ...]] = {}  # stamp at the last write
        self._on_disk: dict[SessionKey, float] = {}  # key -> time of its file's last write

    # -- start ------------------------------------------------------------------------
    def restore_all(self) -> int:
        """Restore every state file into a live session; returns how many came back."""
        for stale in self.directory.glob(".*.tmp"):  # a write interrupted by a crash
            with contextlib.suppress(OSError):
                stale.unlink()
        restored = 0
        for path, mtime in self._files_oldest_first():
            if self._expired(mtime):
                self._remove(path, "expired")
                continue
            try:
                self._restore_file(path)
            except Exception as exc:  # a bad file never stops the server
                self._set_aside(path, exc)
                continue
            restored += 1
            self._count("restored")
        if restored:
            log.info("restored %d session(s) of model %s from %s", restored, self.model, self.directory)
        return restored

    def _files_oldest_first(self) -> list[tuple[Path, float]]:
        found = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            with contextlib.suppress(OSError):
                found.append((path, path.lstat().st_mtime))
        return sorted(found, key=lambda item: item[1])

    def _restore_file(self, path: Path) -> SessionKey:
        data, _ = read_regular(path, self.limits.max_file_bytes)
        model, key, snapshot = decode_file(self.secret, data)
        if model != self.model or path.name != file_name(key):
            raise CorruptStateFile(f"file belongs to model {model!r}, another session")
        session = self.engine.restore(key, snapshot)
        self.budget.record(path, len(data))
        with self._lock:
            self._written[key] = _stamp(session)
            self._on_disk[key] = path.lstat().st_mtime
        return key

    def _set_aside(self, path: Path, exc: Exception) -> None:
        log.error("state file %s of model %s is unusable (%s); moved aside as %s.corrupt",
                  path, self.model, exc, path.name)
        self._count("corrupt")
        self.budget.forget(path)
        try:
            path.replace(path.with_name(path.name + ".corrupt"))
        except OSError as err:
            log.error("cannot move %s aside: %s", path, err)

    # -- while serving ----------------------------------------------------------------
    def before_request(self, sequence_id: SequenceId, start: bool) -> None:
        if not start and isinstance(sequence_id, SessionKey):
            self.revive(sequence_id)

    def after_request(self, sequence_id: SequenceId | None) -> None:
        """Nothing: one server writes every --state-interval, on eviction and at shutdown."""

    def revive(self, key: SessionKey) -> bool:
        """Bring an evicted session back from its file before its next request."""
        if key not in self._on_disk or self.engine.sessions.get(key) is not None:
            return False
        path = self.directory / file_name(key)
        try:
            self._restore_file(path)
        except FileNotFoundError:
            self._discard(key)
            return False
        except Exception as exc:
            self._discard(key)
            self._set_aside(path, exc)
            return False
        self._count("revived")
        return True

    def dropped(self, session: Session, reason: str) -> None:
        """SessionStore.on_drop: keep evicted sessions, forget released ones."""
        key = _key(session)
        if key is None:
            return
        if reason == "evicted":
            with self._lock:
                if key not in self._on_disk or self._written.get(key) != _stamp(session):
                    self._write(session, key, reason)
        else:  # "end", "idle": the sequence is released
            self.forget(key)

    def forget(self, key: SessionKey) -> None:
        with self._lock:
            self._written.pop(key, None)
            self._on_disk.pop(key, None)
            self._unlink(self.directory / file_name(key))

    def flush(self, reason: str = "periodic") -> int:
        """Write every live session changed since its last write; returns how many. Also
        deletes files of sessions that are not live once they are older than the TTL."""
        written = 0
        for session in self.engine.sessions.live():
            key = _key(session)
            if key is None or self._written.get(key) == _stamp(session):
                continue
            with self._lock:
                # A session that left the store meanwhile was handled by dropped().
                if self.engine.sessions.get(key) is session:
                    written += self._write(session, key, reason)
        self.expire()
        return written

    def expire(self, now: float | None = None) -> int:
        """Delete the files of sessions that are not live and older than the TTL."""
        now = time.time() if now is None else now
        with self._lock:
            old = [k for k, t in self._on_disk.items() if self._expired(t, now) and self.engine.sessions.get(k) is None]
            for key in old:
                self._drop_file(key, "expired")
        return len(old)

    # -- internals (call with self._lock held where they touch the maps) ---------------
    def _write(self, session: Session, key: SessionKey, reason: str) -> int:
        stamp = _stamp(session)  # taken before the snapshot: a later change is written next time
        data = encode_file(self.secret, self.model, key, self.engine.snapshot_of(session))
        path = self.directory / file_name(key)
        if len(data) > self.limits.max_file_bytes:
            log.warning("session of %s not persisted: %d bytes exceed --state-max-file-bytes", self.model, len(data))
            self._count("too_large")
            return 0
        if not self.budget.fits(path, len(data)) and not self._make_room(path, len(data)):
            log.warning("session of %s not persisted: --state-max-bytes reached", self.model)
            self._count("over_budget")
            return 0
        try:
            atomic_write(path, data)
        except OSError as exc:  # a full disk must not fail inference; the next flush retries
            log.error("cannot persist session %r of %s: %s", key, self.model, exc)
            self._count("write_failed")
            return 0
        self.budget.record(path, len(data))
        self._written[key] = stamp
        self._on_disk[key] = time.time()
        if self.metrics is not None:
            self.metrics.state_writes.labels(self.model, reason).inc()
        return 1

    def _make_room(self, path: Path, size: int) -> bool:
        """Delete the oldest files of sessions that are not live until ``size`` fits."""
        idle = sorted((t, k) for k, t in self._on_disk.items() if self.engine.sessions.get(k) is None)
        for _, key in idle:
            self._drop_file(key, "dropped_for_space")
            if self.budget.fits(path, size):
                return True
        return self.budget.fits(path, size)

    def _drop_file(self, key: SessionKey, outcome: str) -> None:
        self._written.pop(key, None)
        self._on_disk.pop(key, None)
        self._unlink(self.directory / file_name(key))
        self._count(outcome)

    def _remove(self, path: Path, outcome: str) -> None:
        self._unlink(path)
        self._count(outcome)

    def _unlink(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.budget.forget(path)

    def _discard(self, key: SessionKey) -> None:
        with self._lock:
            self._on_disk.pop(key, None)

    def _expired(self, mtime: float, now: float | None = None) -> bool:
        ttl = self.limits.ttl_s
        return ttl > 0 and (time.time() if now is None else now) - mtime > ttl

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.state_files.labels(self.model, outcome).inc()


def _own_directory(root: Path, model: str) -> Path:
    """``root/model``, created 0700 if missing; refuses a link or anything but a directory
    (the server would otherwise write where the link points)."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory = root / model
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    if not stat.S_ISDIR(directory.lstat().st_mode):
        raise ValueError(f"{directory} is not a directory (a symbolic link or a file): refusing to use it")
    return directory
