"""Drift signals of a stream, computed from what the model sees and predicts.

- ``norm_divergence``: symmetric KL divergence between the per-channel Gaussians of a batch
  at each BatchNorm2d input and the layer's source statistics, averaged over channels and
  layers (0 when the data looks like the training data).
- ``entropy``: mean prediction entropy in nats.
- ``label_shift``: total-variation distance between the recent predicted-label distribution
  and the source prior (uniform unless given), in [0, 1].
Per session they are exponential moving averages; policies add their own (``Adapter.signals``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

_EPS = 1e-5


def symmetric_kl(mean_a: torch.Tensor, var_a: torch.Tensor, mean_b: torch.Tensor, var_b: torch.Tensor) -> torch.Tensor:
    """Per-channel symmetric KL between N(mean_a, var_a) and N(mean_b, var_b)."""
    va, vb = var_a + _EPS, var_b + _EPS
    diff2 = (mean_a - mean_b) ** 2
    return 0.5 * (va / vb + vb / va + diff2 * (1 / va + 1 / vb)) - 1.0


class _Layout:
    """How one pass's BatchNorm calls sit side by side in a flat channel vector: the source
    statistics concatenated, and the [T, L] matrix that averages each call's channels."""

    def __init__(self, layers: Sequence[Any]) -> None:
        self.columns: dict[str, list[int]] = {}  # layer name -> its calls (a layer may run twice)
        for column, layer in enumerate(layers):
            self.columns.setdefault(layer.layer_name, []).append(column)
        self.mean = torch.cat([layer.running_mean.detach().float() for layer in layers])
        self.var = torch.cat([layer.running_var.detach().float() for layer in layers])
        sizes = [layer.running_mean.numel() for layer in layers]
        self.average = torch.zeros(sum(sizes), len(layers))
        start = 0
        for column, size in enumerate(sizes):
            self.average[start : start + size, column] = 1.0 / size
            start += size


_LAYOUTS: OrderedDict[tuple[Any, ...], _Layout] = OrderedDict()


def _layout(layers: tuple[Any, ...]) -> _Layout:
    layout = _LAYOUTS.get(layers)
    if layout is None:
        layout = _LAYOUTS[layers] = _Layout(layers)
        while len(_LAYOUTS) > 32:  # a few models' passes; frozen statistics, so never stale
            _LAYOUTS.popitem(last=False)
    return layout


def divergence_rows(moments: Sequence[Any]) -> list[dict[str, float]]:
    """Per BN layer: mean over channels of the symmetric KL between a batch's and the source
    statistics (averaged when a layer ran more than once in the pass), for every batch of
    ``moments`` — (layer, mean, var) triples of one pass, with [C] moments (one batch) or
    [S, C] (one row per request segment of a shared pass). All layers and segments in a
    few tensor operations and one conversion to Python."""
    if not moments:
        return [{}]
    layout = _layout(tuple(layer for layer, _, _ in moments))
    mean = torch.cat([m.float() for _, m, _ in moments], dim=-1)
    var = torch.cat([v.float() for _, _, v in moments], dim=-1)
    rows = (symmetric_kl(mean, var, layout.mean, layout.var) @ layout.average).reshape(-1, len(moments))
    return [{name: sum(values[c] for c in calls) / len(calls) for name, calls in layout.columns.items()}
            for values in rows.tolist()]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy (nats) of softmax(logits)."""
    logp = torch.log_softmax(logits.detach().float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1)


@dataclass
class DriftTracker:
    """EMAs of one session's drift signals (plain floats: cheap, JSON-able)."""

    num_classes: int
    decay: float = 0.9
    prior: torch.Tensor | None = None
    signals: dict[str, float] = field(default_factory=dict)
    layers: dict[str, float] = field(default_factory=dict)
    label_hist: torch.Tensor | None = None

    def update(self, logits: torch.Tensor, layer_divergence: dict[str, float], extra: dict[str, float]) -> dict[str, float]:
        """Fold one batch in; returns this batch's raw values."""
        batch = {"entropy": float(entropy(logits).mean())}
        if layer_divergence:
            batch["norm_divergence"] = sum(layer_divergence.values()) / len(layer_divergence)
            self.layers = dict(layer_divergence)
        batch["label_shift"] = self._label_shift(logits)
        for name, value in {**batch, **extra}.items():
            if math.isfinite(value):
                old = self.signals.get(name)
                self.signals[name] = value if old is None else self.decay * old + (1 - self.decay) * value
        return batch

    def _label_shift(self, logits: torch.Tensor) -> float:
        counts = torch.bincount(logits.argmax(1), minlength=self.num_classes)[: self.num_classes].float()
        hist = counts / counts.sum()
        self.label_hist = hist if self.label_hist is None else self.decay * self.label_hist + (1 - self.decay) * hist
        prior = self.prior if self.prior is not None else torch.full_like(hist, 1.0 / self.num_classes)
        return float(0.5 * (self.label_hist - prior).abs().sum())
