"""ttaserve: a Triton-compatible inference server that adapts models at test time."""

from ttaserve.engine import Engine

__version__ = "0.1.0"
__all__ = ["Engine", "__version__"]
