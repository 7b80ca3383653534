"""How many bytes the state files of all models take (``--state-max-bytes``).

One budget is shared by every model's StateStore; it only knows the files the server wrote
or restored (their sizes are recorded then), so checking a write costs a dictionary lookup,
not a directory scan.
"""

from __future__ import annotations

import threading
from pathlib import Path


class DiskBudget:
    def __init__(self, max_bytes: int = 0) -> None:
        self.max_bytes = max_bytes  # 0: unbounded
        self._sizes: dict[Path, int] = {}
        self._total = 0
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return self._total

    def fits(self, path: Path, size: int) -> bool:
        """Whether writing ``size`` bytes at ``path`` (replacing what is there) stays within."""
        with self._lock:
            return not self.max_bytes or self._total - self._sizes.get(path, 0) + size <= self.max_bytes

    def record(self, path: Path, size: int) -> None:
        with self._lock:
            self._total += size - self._sizes.get(path, 0)
            self._sizes[path] = size

    def forget(self, path: Path) -> None:
        with self._lock:
            self._total -= self._sizes.pop(path, 0)
