"""``prior-shift``: correct a classifier's outputs for a change in class frequencies.

A worked example of a policy in one file (docs/POLICIES.md walks through it). It is not
shipped: copied into ``ttaserve/adapters/`` it would be registered and served like the
built-in policies; the test suite loads it from here and runs it through the same contract
tests and a real server.

Implemented from the paper: Saerens, Latinne, Decaestecker, "Adjusting the outputs of a
classifier to new a priori probabilities: a simple procedure", Neural Computation 14(1),
2002. Under label shift the class frequencies change but each class looks the same, so

    p_test(y | x)  ∝  p_train(y | x) · prior_test(y) / prior_train(y)

The paper estimates ``prior_test`` by EM over a fixed test set. A stream has no fixed set,
so this policy keeps the estimate per session as an exponential moving average of its
batches' corrected predictions (one EM step per batch), and assumes the training classes
were balanced (``prior_train`` uniform, as for Fashion-MNIST). A fresh session predicts
exactly like ``source``. It only helps when the label mix really shifts; on a stream whose
classes come in runs it chases the current run, which is why it is an example here and not
a recommended policy.

State: ``prior`` [C], the session's estimate of the test class frequencies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ttaserve.adapters import ModelError, PreparedModel, TensorState, bounds, normalizer, register


@dataclass(frozen=True)
class PriorShiftParams:
    momentum: float = field(default=0.1, metadata=bounds(0.0, 1.0))  # weight of the newest batch, in (0, 1]
    floor: float = field(default=1e-3, metadata=bounds(0.0, 1.0))  # no class's estimate falls below this

    def __post_init__(self) -> None:
        if not 0.0 < self.momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {self.momentum}")
        if not 0.0 < self.floor < 1.0:
            raise ValueError(f"floor must be in (0, 1), got {self.floor}")


@register
class PriorShift:
    name: ClassVar[str] = "prior-shift"
    description: ClassVar[str] = (
        "re-weight predictions by the stream's estimated class frequencies (Saerens et al. 2002)"
    )
    Params: ClassVar[type] = PriorShiftParams

    def __init__(self, params: PriorShiftParams = PriorShiftParams()) -> None:
        self.params = params

    def check(self, model: PreparedModel) -> None:
        if model.num_classes < 2:
            raise ModelError(f"policy {self.name!r} needs a classifier head with at least two classes")

    def init_state(self, model: PreparedModel) -> TensorState:
        classes = model.num_classes
        return TensorState(prior=torch.full((classes,), 1.0 / classes))

    def forward(
        self, model: PreparedModel, x: torch.Tensor, state: TensorState, adapt: bool = True
    ) -> torch.Tensor:
        with torch.no_grad(), normalizer(None):  # the model itself is not adapted
            logits = model(x)
        prior = state["prior"]
        # log(prior_test / prior_train) with a uniform prior_train: exactly 0 in a fresh session
        corrected = logits + torch.log(prior * prior.numel())
        if adapt:
            batch = torch.softmax(corrected, dim=1).mean(dim=0)
            estimate = ((1 - self.params.momentum) * prior + self.params.momentum * batch).clamp_min(self.params.floor)
            state["prior"] = estimate / estimate.sum()
        return corrected

    def signals(self, state: TensorState) -> dict[str, float]:
        prior = state["prior"]
        return {"prior_max": float(prior.max()), "prior_entropy": float(-(prior * prior.log()).sum())}
