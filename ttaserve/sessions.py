"""Per-sequence adaptation sessions: (model, sequence_id) -> (policy, state, counters)."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ttaserve.adapters import Adapter, TensorState
from ttaserve.adapters.guard import CollapseGuard
from ttaserve.adapters.safety import SafetyNet
from ttaserve.drift import DriftTracker
from ttaserve.errors import InvalidInput

log = logging.getLogger(__name__)

SequenceId = int | str


@dataclass
class Session:
    """One client stream's adaptation: its policy, its state and what happened to it."""

    sequence_id: SequenceId
    policy: str
    params: dict[str, Any]
    adapter: Adapter
    state: TensorState
    created: float = field(default_factory=time.time)
    last_active: float = field(default_factory=time.monotonic)
    batches: int = 0
    samples: int = 0
    resets: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)  # updates refused (ttaserve/outliers.py)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Collapse signals of a stateful session (None: stateless policy or guard disabled).
    guard: CollapseGuard | None = None
    # Safety net (None: the source policy, or the net is disabled); adapters/safety.py.
    safety: SafetyNet | None = None
    fallbacks: Counter[str] = field(default_factory=Counter)  # safety-net fallbacks by reason
    # Drift signals (EMAs) of this stream; see ttaserve/drift.py.
    drift: DriftTracker | None = None


@dataclass(frozen=True)
class SessionLimits:
    idle_timeout_s: float = 600.0  # sessions idle this long are dropped
    max_sessions: int = 10_000  # beyond this the least recently used session is evicted
    strict: bool = False  # Triton's behaviour: an unknown id needs sequence_start


class SessionStore:
    """Thread-safe map of live sessions of one model, with idle expiry and a size cap.

    ``on_drop(session, reason)`` is called for every session that leaves the store
    (``end``, ``idle``, ``evicted``), e.g. to persist it or count it.
    """

    def __init__(
        self,
        limits: SessionLimits = SessionLimits(),
        on_drop: Callable[[Session, str], None] | None = None,
    ) -> None:
        self.limits = limits
        self._sessions: dict[SequenceId, Session] = {}
        self._lock = threading.Lock()
        self._on_drop = on_drop

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, sequence_id: SequenceId) -> Session | None:
        with self._lock:
            return self._sessions.get(sequence_id)

    def live(self) -> list[Session]:
        """The live sessions, as a list the caller may iterate while requests go on."""
        with self._lock:
            return list(self._sessions.values())

    def open(
        self, sequence_id: SequenceId, start: bool, make: Callable[[], Session]
    ) -> tuple[Session, bool]:
        """The live session for ``sequence_id`` (a new one on start or first sight).
        Returns (session, created)."""
        dropped: list[tuple[Session, str]] = []
        with self._lock:
            current = self._sessions.get(sequence_id)
            if current is not None and not start:
                current.last_active = time.monotonic()
                return current, False
            if current is None and not start and self.limits.strict:
                raise InvalidInput(
                    f"sequence {sequence_id!r} is not active: send sequence_start=true on its "
                    "first request (the server runs with strict sequences)"
                )
            if current is None:
                dropped = self._make_room()
            session = make()
            self._sessions[sequence_id] = session
        self._notify(dropped)
        return session, True

    def end(self, sequence_id: SequenceId) -> Session | None:
        return self._drop(sequence_id, "end")

    def evict(self, sequence_id: SequenceId) -> Session | None:
        """Remove a session to free memory; ``on_drop`` hears "evicted", as for the count cap."""
        return self._drop(sequence_id, "evicted")

    def _drop(self, sequence_id: SequenceId, reason: str) -> Session | None:
        with self._lock:
            session = self._sessions.pop(sequence_id, None)
        if session is not None:
            self._notify([(session, reason)])
        return session

    def expire_idle(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [
                s for s in self._sessions.values()
                if now - s.last_active > self.limits.idle_timeout_s
            ]
            for s in stale:
                del self._sessions[s.sequence_id]
        self._notify([(s, "idle") for s in stale])
        return len(stale)

    def drain(self) -> list[Session]:
        """Remove and return every session (shutdown)."""
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        return sessions

    def _make_room(self) -> list[tuple[Session, str]]:
        evicted = []
        while len(self._sessions) >= self.limits.max_sessions:
            oldest = min(self._sessions.values(), key=lambda s: s.last_active)
            del self._sessions[oldest.sequence_id]
            evicted.append((oldest, "evicted"))
        return evicted

    def _notify(self, dropped: list[tuple[Session, str]]) -> None:
        if self._on_drop is None:
            return
        for session, reason in dropped:
            self._on_drop(session, reason)
