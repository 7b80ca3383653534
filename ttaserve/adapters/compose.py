"""Compositions: a normalization policy under a prediction-side policy, ``NORM+PRED``.

``alpha-bn+adanpc`` runs AdaNPC's kNN vote over features that alpha-bn normalized;
``graded-bn+ecotta`` trains EcoTTA's meta networks beside a frozen network whose
BatchNorm layers graded-bn normalizes. The normalization part is any policy with a
``normalization`` method (:class:`~ttaserve.adapters.base.NormalizationPolicy`); the
prediction part any policy that declares ``over_normalization = True`` (it runs the
model's BatchNorm layers with whatever normalizer is active instead of forcing source
statistics).

Parameters are named ``PART.KEY`` (``alpha-bn.alpha=0.2``, ``adanpc.k=50``); a key that
only one part has may be given bare. The state is both parts' states, prefixed ``norm.``
and ``pred.``; the normalization commits after the prediction policy has run, from the
logits the composition returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ttaserve.adapters.base import Adapter, NormalizationPolicy, TensorState
from ttaserve.adapters.model import PreparedModel, normalizer

SEPARATOR = "+"


@dataclass(frozen=True)
class CompositeParams:
    """The two parts' own parameter dataclasses."""

    norm: Any
    pred: Any


def is_composite(name: str) -> bool:
    return SEPARATOR in name


def split(name: str) -> tuple[str, str]:
    parts = name.split(SEPARATOR)
    if len(parts) != 2 or not all(parts):
        raise ValueError(
            f"a composed policy is NORM+PRED (two names), got {name!r}; e.g. 'graded-bn+adanpc'"
        )
    return parts[0], parts[1]


def can_normalize(adapter: Adapter) -> bool:
    # source is a NormalizationPolicy only so that it can share forward passes; under a
    # prediction-side policy it would change nothing
    return isinstance(adapter, NormalizationPolicy) and adapter.name != "source"


def can_predict_over(adapter: Adapter) -> bool:
    return bool(getattr(adapter, "over_normalization", False))


class Composite:
    """``norm`` supplies the BatchNorm statistics, ``pred`` makes (and learns from) the
    predictions. Built by :func:`ttaserve.adapters.registry.create_adapter`."""

    Params: ClassVar[type] = CompositeParams
    description: ClassVar[str] = "a normalization policy under a prediction-side policy"

    def __init__(self, norm: Adapter, pred: Adapter) -> None:
        if not can_normalize(norm):
            raise ValueError(f"{norm.name!r} cannot be the normalization part of a composition")
        if not can_predict_over(pred):
            raise ValueError(f"{pred.name!r} cannot run over another policy's normalization")
        self.norm, self.pred = norm, pred
        self.name = f"{norm.name}{SEPARATOR}{pred.name}"  # type: ignore[misc]
        self.params = CompositeParams(norm.params, pred.params)

    def check(self, model: PreparedModel) -> None:
        self.norm.check(model)
        self.pred.check(model)

    def init_state(self, model: PreparedModel) -> TensorState:
        state = TensorState({f"norm.{k}": v for k, v in self.norm.init_state(model).items()})
        state.update({f"pred.{k}": v for k, v in self.pred.init_state(model).items()})
        return state

    def forward(
        self, model: PreparedModel, x: torch.Tensor, state: TensorState, adapt: bool = True
    ) -> torch.Tensor:
        norm_state, pred_state = _part(state, "norm."), _part(state, "pred.")
        normalization = self.norm.normalization(model, norm_state, x)  # type: ignore[attr-defined]
        with normalizer(normalization.hook):
            logits = self.pred.forward(model, x, pred_state, adapt)
        if adapt:
            with torch.no_grad():
                normalization.commit(logits)
        state.update({f"norm.{k}": v for k, v in norm_state.items()})
        state.update({f"pred.{k}": v for k, v in pred_state.items()})
        return logits

    def signals(self, state: TensorState) -> dict[str, float]:
        norm = self.norm.signals(_part(state, "norm."))
        pred = self.pred.signals(_part(state, "pred."))
        return {**{f"norm_{k}": v for k, v in norm.items()}, **{f"pred_{k}": v for k, v in pred.items()}}


def _part(state: TensorState, prefix: str) -> TensorState:
    return TensorState({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def split_params(names: tuple[str, str], params: dict[str, Any],
                 known: tuple[set[str], set[str]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route ``PART.KEY`` (or a bare key only one part has) to that part's parameters."""
    out: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
    for key, value in params.items():
        part, dot, bare = key.rpartition(".")
        if dot:
            if part not in names:
                raise ValueError(f"parameter {key!r}: {part!r} is not a part of {SEPARATOR.join(names)!r}")
            out[names.index(part)][bare] = value
            continue
        owners = [i for i in (0, 1) if key in known[i]]
        if len(owners) != 1:
            which = "both parts have it" if owners else "neither part has it"
            raise ValueError(f"parameter {key!r} of {SEPARATOR.join(names)!r}: {which}; "
                             f"name it PART.{key} (e.g. {names[0]}.{key})")
        out[owners[0]][key] = value
    return out
