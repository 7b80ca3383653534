"""Safety net: notice when a session's adaptation is hurting and fall back to the source
model for a while.

The collapse guard (guard.py) catches total collapse. This catches the quieter failure
every adaptive policy has on some streams: adapting where the source model was already
right (clean data arriving label-sorted, mild shifts), or drifting into fewer classes than
the data has. It needs no labels. A small share of each session's samples is also run
through the source model (``check_fraction`` of the samples, ``warmup_fraction`` during a
session's first ``warmup_samples``; at least ``min_check`` samples per source forward, so
small batches are checked every few requests rather than one sample at a time), and two
signals are kept as moving averages over about ``memory`` checked samples:

* **confident source, less confident adaptation** (reason ``entropy``): the source model's
  normalized prediction entropy on the checked samples is below ``confident_entropy`` (it
  finds the data familiar) while the adapted predictions on the same samples are more
  uncertain by more than ``entropy_margin``. Measured on the validation split (docs/POLICIES.md
  "Safety net"): where adapting helps, either the source model is uncertain (noise, blur,
  weather, intensity shifts: source entropy 0.23-0.47 of ln C) or adaptation makes it more
  sure; where it hurts (clean or mildly shifted data, label-sorted), the source model is
  sure (0.09-0.17) and adaptation makes it less so (+0.07 to +0.11). Disagreement with the
  source model is reported but not used: it is highest exactly where adaptation helps most.
  The defaults are deliberately conservative: with a threshold of 0.2 and a margin of 0.03
  the net also fired on label-sorted corrupted streams where graded-bn was helping, and every
  restart cost more than the fallback saved (sorted b64 36.6 -> 41.5 % error); at 0.12/0.05
  it leaves graded-bn within 0.6 points of running without it and still switches tbn off on
  clean label-sorted data.
* **marginal collapse** (reason ``marginal``): the entropy of the adapted predictions'
  average distribution falls below ``collapse_ratio`` times that of the source model's on
  the same samples: adaptation is squeezing the output into fewer classes than the source
  model sees in the same data (a label-sorted stream concentrates both alike).

A decision needs ``min_evidence`` checked samples. On a fallback the session's policy state
is reset to its initial state and the session is answered by the source model for
``cooldown`` samples (doubling on each further fallback up to ``max_cooldown``); then it
adapts again from the fresh state. Each fallback is counted by reason.

All mutable data is in ``state`` (tensors), so it snapshots and restores with the session.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch

from ttaserve.adapters.base import TensorState

Reason = Literal["entropy", "marginal"]
REASONS: tuple[Reason, ...] = ("entropy", "marginal")


@dataclass(frozen=True)
class SafetyConfig:
    enabled: bool = True  # False: no source checks, never falls back
    check_fraction: float = 1 / 16  # share of samples also run through the source model
    warmup_fraction: float = 1 / 4  # the share during a session's first warmup_samples
    warmup_samples: int = 256
    min_check: int = 4  # samples per source forward (fewer only when the batch is smaller)
    confident_entropy: float = 0.12  # source entropy (fraction of ln C) below which it is trusted
    entropy_margin: float = 0.05  # adapted entropy above the source's by this much: fall back
    collapse_ratio: float = 0.25  # adapted marginal entropy below this x the source's: fall back
    memory: float = 32.0  # checked samples the signal averages remember (time constant)
    min_evidence: int = 32  # checked samples before any decision
    cooldown: int = 256  # samples answered by the source model after a fallback
    max_cooldown: int = 4096  # the cooldown doubles per fallback up to this

    def __post_init__(self) -> None:
        for name in ("check_fraction", "warmup_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("warmup_samples", "min_evidence", "cooldown", "max_cooldown"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.min_check < 1 or self.memory < 1:
            raise ValueError("min_check and memory must be >= 1")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> SafetyConfig:
        """From ``KEY=VALUE`` settings (``--safety KEY=VALUE``); unknown keys are refused."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(f"unknown safety-net setting(s) {unknown}; known: {sorted(known)}")
        casts: dict[str, Any] = {"bool": _boolean, "int": int, "float": float}
        return cls(**{k: casts[str(known[k].type)](v) for k, v in params.items()})


def _boolean(value: Any) -> bool:
    if isinstance(value, str):
        if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"expected true or false, got {value!r}")
        return value.lower() in ("1", "true", "yes", "on")
    return bool(value)


def normalized_entropies(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of softmax(logits) / ln C."""
    log_p = logits.float().log_softmax(1)
    return -(log_p.exp() * log_p).sum(1) / math.log(max(logits.shape[1], 2))


def _entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


class SafetyNet:
    """One session's safety-net signals, sampling schedule and fallback state."""

    def __init__(self, config: SafetyConfig, num_classes: int) -> None:
        self.config = config
        self.num_classes = max(num_classes, 1)
        self.state = self.init_state()

    def init_state(self) -> TensorState:
        c = self.num_classes
        zero = lambda: torch.zeros((), dtype=torch.float64)  # noqa: E731
        return TensorState(
            seen=torch.zeros((), dtype=torch.int64), budget=zero(), checked=zero(),
            source_entropy=zero(), entropy_gap=zero(), disagreement=zero(),
            adapted_marginal=torch.full((c,), 1.0 / c, dtype=torch.float64),
            source_marginal=torch.full((c,), 1.0 / c, dtype=torch.float64),
            cooldown=torch.zeros((), dtype=torch.int64),
            next_cooldown=torch.tensor(self.config.cooldown, dtype=torch.int64),
        )

    @property
    def falling_back(self) -> bool:
        """True while the session is answered by the source model."""
        return int(self.state["cooldown"]) > 0

    def served_from_source(self, batch: int) -> bool:
        """Count a batch answered from source during the cooldown; True when the cooldown
        just ended (the session adapts again from its initial state)."""
        left = max(int(self.state["cooldown"]) - batch, 0)
        self.state["cooldown"] = torch.tensor(left, dtype=torch.int64)
        return left == 0

    def samples_to_check(self, batch: int) -> int:
        """How many leading samples of this adapted batch to also run through source."""
        config, state = self.config, self.state
        seen = int(state["seen"])
        share = config.warmup_fraction if seen < config.warmup_samples else config.check_fraction
        state["seen"] = torch.tensor(seen + batch, dtype=torch.int64)
        budget = float(state["budget"]) + batch * share
        due = min(budget, batch) >= min(config.min_check, batch) and share > 0
        take = min(batch, int(budget)) if due else 0
        state["budget"] = torch.tensor(budget - take, dtype=torch.float64)
        return take

    def observe(self, adapted: torch.Tensor, source: torch.Tensor) -> Reason | None:
        """Fold the checked samples' adapted and source logits into the signals; returns
        why to fall back, or None."""
        config, state = self.config, self.state
        n = adapted.shape[0]
        step = 1.0 - (1.0 - 1.0 / config.memory) ** n
        first = float(state["checked"]) == 0.0
        h_adapted, h_source = normalized_entropies(adapted), normalized_entropies(source)
        values = {
            "source_entropy": float(h_source.mean()),
            "entropy_gap": float((h_adapted - h_source).mean()),
            "disagreement": float((adapted.argmax(1) != source.argmax(1)).double().mean()),
        }
        for key, value in values.items():
            old = float(state[key])
            state[key] = torch.tensor(value if first else old + step * (value - old), dtype=torch.float64)
        for key, logits in (("adapted_marginal", adapted), ("source_marginal", source)):
            mean = logits.double().softmax(1).mean(0)
            state[key] = mean if first else state[key] + step * (mean - state[key])
        state["checked"] = state["checked"] + n
        return self._verdict()

    def _verdict(self) -> Reason | None:
        config, state = self.config, self.state
        if float(state["checked"]) < config.min_evidence:
            return None
        if (float(state["source_entropy"]) < config.confident_entropy
                and float(state["entropy_gap"]) > config.entropy_margin):
            return "entropy"
        if _entropy(state["adapted_marginal"]) < config.collapse_ratio * _entropy(state["source_marginal"]):
            return "marginal"
        return None

    def fall_back(self) -> None:
        """Start a cooldown (and double the next one); the signals start over."""
        cooldown = int(self.state["next_cooldown"])
        fresh = self.init_state()
        fresh["cooldown"] = torch.tensor(cooldown, dtype=torch.int64)
        fresh["next_cooldown"] = torch.tensor(min(2 * cooldown, self.config.max_cooldown), dtype=torch.int64)
        self.state = fresh  # seen starts over too: a restarted session is checked as a new one

    def signals(self) -> dict[str, float]:
        state = self.state
        return {
            "source_entropy": float(state["source_entropy"]),
            "entropy_gap": float(state["entropy_gap"]),
            "disagreement": float(state["disagreement"]),
            "falling_back": float(self.falling_back),
        }
