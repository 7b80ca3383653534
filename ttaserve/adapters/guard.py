"""Collapse guard: decide when a session's adaptation has failed and must be reset.

Anchors: SAR (Niu et al., ICLR 2023) recovers the model when an EMA of the entropy falls
below a threshold; RDumb (Press et al., NeurIPS 2023) shows periodic resets are a strong
guard against collapse; EATA (Niu et al., ICML 2022) filters on entropy. This module
combines an entropy signal with a diversity signal, per session.

Signals (per session, kept as tensors so they can be snapshotted and restored):

- ``entropy_ema``: EMA over batches of the mean prediction entropy, *normalized* by
  ln C (so 0 = one-hot, 1 = uniform) to make the floor independent of the label count;
- ``window``: the classes predicted for the last ``window`` samples (a ring buffer);
  from it the number of distinct classes and the fraction taken by the top class.

Rule: ``observe`` returns ``"collapse"`` when the window is full, the model has more than
one class, the entropy EMA is below ``entropy_floor`` **and** the top class holds more than
``top_fraction`` of the window; it returns ``"non_finite"`` when the logits, the policy's
state tensors or the guard's own tensors contain NaN or Inf. Otherwise ``None``.

Why both conditions: a label-sorted stream legitimately fills a window with one class, and
a well-adapted model is legitimately confident. Only the two together are taken as
collapse. A sorted stream on which the model is *very* confident (normalized entropy
below the floor, i.e. far more confident than the source model is on clean data) is
therefore reset; this is deliberate: such a session is indistinguishable from a collapsed
one by unsupervised signals, and a reset only returns it to the policy's initial state,
which costs little when the stream is easy. The defaults keep the floor well below the
demo model's clean-data entropy, so confident-and-correct streams rarely reach it.

Defaults (measured on the demo model and Fashion-MNIST test images): ``entropy_floor =
0.01`` -- the source model's normalized entropy on clean data is 0.09 overall and 0.014 in
its most confident class (trousers), while a tent session driven to collapse (lr 0.1,
label-sorted noisy stream) passes 0.01 on its way to 0.001 with one class taking > 97 % of
the window; ``ema_decay = 0.9`` (about ten batches of memory, so one odd batch does not
trigger a reset); ``window = 256`` samples (four batches of 64; longer than one class block
of a label-sorted 10-class stream of a few hundred samples per class); ``top_fraction =
0.9`` (one class holding nine tenths of the window).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from ttaserve.adapters.base import TensorState

Reason = Literal["collapse", "non_finite"]


@dataclass(frozen=True)
class GuardConfig:
    enabled: bool = True  # False: sessions are never reset by the guard
    entropy_floor: float = 0.01  # on the entropy EMA, as a fraction of ln(num_classes)
    ema_decay: float = 0.9  # weight of the past in the entropy EMA (per batch)
    window: int = 256  # predicted classes remembered (samples, not batches)
    top_fraction: float = 0.9  # collapse when the top class exceeds this share of the window

    def __post_init__(self) -> None:
        if not 0.0 <= self.entropy_floor <= 1.0:
            raise ValueError(f"entropy_floor must be in [0, 1] (fraction of ln C), got {self.entropy_floor}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy of softmax(logits) divided by ln C (0 for C = 1)."""
    num_classes = logits.shape[1]
    if num_classes < 2:
        return torch.zeros((), dtype=torch.float32)
    entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
    return (entropy / math.log(num_classes)).to(torch.float32)


def all_finite(tensors: Mapping[str, torch.Tensor]) -> bool:
    """True when every floating-point tensor of the mapping is free of NaN and Inf."""
    floats = [t.reshape(-1) for t in tensors.values() if t.is_floating_point()]
    if not floats:
        return True
    # One check over all of them: a state holds dozens of small tensors, and one call per
    # tensor cost more than the check itself.
    return bool(torch.isfinite(torch.cat(floats) if len(floats) > 1 else floats[0]).all())


class CollapseGuard:
    """One session's collapse signals and the reset rule.

    ``state`` holds all of the guard's mutable data as tensors: ``entropy_ema`` (float32
    scalar), ``window`` (int64 ring buffer of predicted classes, -1 = empty), ``seen``
    (int64 count of samples observed) and ``num_classes`` (int64; 0 until first seen).
    """

    def __init__(self, config: GuardConfig = GuardConfig()) -> None:
        self.config = config
        self.state = self.init_state()

    def init_state(self) -> TensorState:
        return TensorState(
            entropy_ema=torch.zeros((), dtype=torch.float32),
            window=torch.full((self.config.window,), -1, dtype=torch.int64),
            seen=torch.zeros((), dtype=torch.int64),
            num_classes=torch.zeros((), dtype=torch.int64),
        )

    def reset(self) -> None:
        self.state = self.init_state()

    def observe(
        self, logits: torch.Tensor, policy_state: Mapping[str, torch.Tensor] | None = None
    ) -> Reason | None:
        """Record a batch's logits (and check the policy state after its update).
        Returns why the session should be reset, or None."""
        if not self.config.enabled:
            return None
        logits = logits.detach()
        if not bool(torch.isfinite(logits).all()) or not all_finite(self.state):
            return "non_finite"
        if policy_state is not None and not all_finite(policy_state):
            return "non_finite"
        self._record(logits)
        return "collapse" if self._collapsed() else None

    def signals(self) -> dict[str, float]:
        """Entropy EMA, distinct classes and top-class share of the window (for metrics)."""
        window = self.state["window"]
        filled = window[window >= 0]
        counts = torch.bincount(filled) if filled.numel() else torch.zeros(1, dtype=torch.int64)
        return {
            "entropy_ema": float(self.state["entropy_ema"]),
            "distinct_classes": float((counts > 0).sum()),
            "top_fraction": float(counts.max()) / max(int(filled.numel()), 1),
        }

    def _record(self, logits: torch.Tensor) -> None:
        state = self.state
        entropy = normalized_entropy(logits)
        first = int(state["seen"]) == 0
        decay = self.config.ema_decay
        # The first batch seeds the EMA, so it does not start from an artificial zero.
        state["entropy_ema"] = entropy if first else decay * state["entropy_ema"] + (1 - decay) * entropy
        predicted = logits.argmax(1)[-self.config.window:]
        # Only the last `window` predictions of a large batch survive; they keep their
        # stream positions so the ring buffer stays in stream order.
        seen, size = int(state["seen"]), self.config.window
        start = seen + logits.shape[0] - predicted.numel()
        positions = (torch.arange(predicted.numel()) + start) % size
        window = state["window"].clone()
        window[positions] = predicted
        state["window"] = window
        state["seen"] = torch.tensor(seen + logits.shape[0], dtype=torch.int64)
        state["num_classes"] = torch.tensor(logits.shape[1], dtype=torch.int64)

    def _collapsed(self) -> bool:
        state, config = self.state, self.config
        if int(state["num_classes"]) < 2 or int(state["seen"]) < config.window:
            return False
        if float(state["entropy_ema"]) >= config.entropy_floor:
            return False
        counts = torch.bincount(state["window"])
        return float(counts.max()) > config.top_fraction * config.window
