"""What a row of the accuracy table is, and where its predictions come from.

:mod:`ttaserve.bench.accuracy` runs the grid and :mod:`ttaserve.bench.accuracy_grpc`
predicts through a real server; both build on the types here, so neither imports the other
back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ttaserve.adapters import PreparedModel
from ttaserve.adapters.guard import GuardConfig
from ttaserve.adapters.safety import SafetyConfig
from ttaserve.engine import Engine

__all__ = ["EnginePredictor", "Predictor", "Row", "engine_for"]


@dataclass(frozen=True)
class Row:
    """One line of the table: a policy with parameters, on a model, with or without guard."""

    label: str
    policy: str
    params: tuple[tuple[str, Any], ...] = ()
    model: str = "demo"  # "demo" (the expert) or "generalist" (T3's other model)
    guard: bool = True  # the engine's collapse guard (on in the server)
    safety: bool = True  # the engine's safety net (on in the server)

    @property
    def servable(self) -> bool:
        """Whether the stock server can run this row (it serves the demo, guard and net on)."""
        return self.model == "demo" and self.guard and self.safety



class Predictor(Protocol):
    """Where a row's predictions come from (in-process engine or the gRPC server)."""

    path: str

    def predict(self, x: torch.Tensor, session: str, start: bool, end: bool) -> torch.Tensor: ...

    def finish(self, session: str) -> int | None: ...  # collapse-guard resets of the session

    def close(self) -> None: ...


class EnginePredictor:
    def __init__(self, engine: Engine, path: str = "in-process") -> None:
        self.engine = engine
        self.path = path

    def predict(self, x: torch.Tensor, session: str, start: bool, end: bool) -> torch.Tensor:
        return self.engine.predict(x, session=session, start=start)

    def finish(self, session: str) -> int | None:
        live = self.engine.sessions.get(session)
        resets = sum(live.resets.values()) if live is not None else 0
        self.engine.sessions.end(session)
        return resets

    def close(self) -> None:
        pass


def engine_for(row: Row, models: dict[str, PreparedModel]) -> Engine:
    return Engine(models[row.model], row.policy, guard=GuardConfig(enabled=row.guard), track_drift=False,
                  safety=SafetyConfig(enabled=row.safety), **dict(row.params))


