"""ttaserve: a Triton-compatible inference server that adapts models at test time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ttaserve.engine import Engine

__version__ = "0.1.0"
__all__ = ["Engine", "__version__"]


def __getattr__(name: str) -> Any:
    # Engine imports torch (seconds); commands that only talk to a server never need it.
    if name == "Engine":
        from ttaserve.engine import Engine

        return Engine
    raise AttributeError(f"module 'ttaserve' has no attribute {name!r}")
