"""Charts of the benchmarks. matplotlib is optional (the ``bench`` extra): without it a
benchmark still writes its JSON and its table and says which chart it left out."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["MISSING", "draw"]

log = logging.getLogger(__name__)

MISSING = ("matplotlib is not installed, so the chart {path} was not drawn (pip install "
           "'ttaserve[bench]' adds it); the JSON and table results were written")


def draw(path: Path, render: Callable[[Any, Path], None]) -> Path | None:
    """``render(pyplot, path)`` draws and saves the chart; returns ``path``, or None (after
    logging why) when matplotlib is missing."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        log.warning(MISSING.format(path=path))
        return None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    render(plt, path)
    return path
