"""The bytes of session state one model holds (``--max-session-memory``), evicting the least
recently used sessions past the budget.

``--max-sessions`` caps a count, but clients choose policies whose state differs by orders
of magnitude (``source``: nothing; ``unmix-tns``: 400 KiB per session on the demo model), so
a count alone does not bound memory. Every request, SetPolicy and RestoreSession charges its
session's current size here (state plus collapse-guard tensors); when the total passes the
budget, the least recently charged sessions are evicted exactly like the count cap evicts:
with ``--state-dir`` they are written to disk and revived on their next request. A single
session larger than the whole budget is evicted too, right after its request was answered.
Eviction by bytes is counted in ``ttaserve_session_memory_evictions_total``; the counted
total is ``ttaserve_session_state_bytes``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from ttaserve.sessions import SequenceId, Session, SessionStore


def session_bytes(session: Session) -> int:
    guard = session.guard.state.nbytes() if session.guard is not None else 0
    return session.state.nbytes() + guard


class SessionMemory:
    def __init__(self, sessions: SessionStore, max_bytes: int = 0,
                 on_evict: Callable[[int], None] | None = None) -> None:
        self.sessions = sessions
        self.max_bytes = max_bytes  # 0: no budget (sizes are still counted)
        self._sizes: OrderedDict[SequenceId, int] = OrderedDict()  # least recently charged first
        self._total = 0
        self._lock = threading.Lock()
        self._on_evict = on_evict

    @property
    def total(self) -> int:
        return self._total

    def charge(self, key: SequenceId) -> int:
        """Record the session's current size and evict past the budget; returns how many
        sessions were evicted."""
        session = self.sessions.get(key)
        if session is None:
            self.forget(key)
            return 0
        size = session_bytes(session)
        victims: list[SequenceId] = []
        with self._lock:
            self._total += size - self._sizes.pop(key, 0)
            self._sizes[key] = size
            while self.max_bytes and self._total > self.max_bytes and self._sizes:
                victim, freed = self._sizes.popitem(last=False)
                self._total -= freed
                victims.append(victim)
        for victim in victims:
            self.sessions.evict(victim)
        if victims and self._on_evict is not None:
            self._on_evict(len(victims))
        return len(victims)

    def forget(self, key: SequenceId) -> None:
        """A session left the store (ended, expired, evicted)."""
        with self._lock:
            self._total -= self._sizes.pop(key, 0)
