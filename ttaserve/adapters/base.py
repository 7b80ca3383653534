"""What every policy provides, and the container its per-session state lives in."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from ttaserve.adapters.model import AdaptiveBatchNorm2d, PreparedModel, normalizer


class TensorState(dict[str, torch.Tensor]):
    """A session's adaptation state: named tensors, nothing else.

    ``state_dict()`` returns detached clones (a snapshot); ``load_state_dict()`` replaces
    the contents after checking that the names match, so a snapshot taken from one session
    restores exactly into another of the same policy and model.
    """

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.items()}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        missing, unexpected = set(self) - set(tensors), set(tensors) - set(self)
        if missing or unexpected:
            raise ValueError(
                f"state does not match this policy: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )
        for name, value in tensors.items():
            current = self[name]
            if value.dtype != current.dtype or value.shape[1:] != current.shape[1:]:
                raise ValueError(
                    f"state tensor {name!r}: got {value.dtype} {tuple(value.shape)}, "
                    f"expected {current.dtype} with trailing shape {tuple(current.shape[1:])}"
                )
            self[name] = value.detach().clone().requires_grad_(current.requires_grad)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.values())


@runtime_checkable
class Adapter(Protocol):
    """A test-time adaptation policy. The object is immutable; all mutable data is in the
    :class:`TensorState` it creates.

    Segment support: a policy that also implements ``normalization``
    (:class:`NormalizationPolicy`; ``source`` too) shares forward passes with other
    requests and sessions (ttaserve/batching.py: each request segment is normalized by its
    own session's normalizer); so does one that implements ``predict_features``
    (:class:`FeaturePolicy`: adanpc). Other policies run one request at a time."""

    name: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type]  # frozen dataclass of the policy's parameters
    params: Any  # the policy's frozen parameter dataclass

    def check(self, model: PreparedModel) -> None:
        """Raise ModelError if the policy cannot run on this model."""

    def init_state(self, model: PreparedModel) -> TensorState:
        """The state of a fresh session (deterministic: reset == init_state again)."""

    def forward(
        self, model: PreparedModel, x: torch.Tensor, state: TensorState, adapt: bool = True
    ) -> torch.Tensor:
        """Predict for x with the current state, then (if adapt) update the state."""

    def signals(self, state: TensorState) -> dict[str, float]:
        """Policy-specific signals of a session (memory size, merging coefficient, loss ...):
        reported beside the drift signals (ttaserve/drift.py) and as metrics."""


class Normalization(Protocol):
    """One forward pass of a normalization policy: ``hook`` normalizes every BatchNorm2d
    input (see :func:`ttaserve.adapters.model.normalizer`; None: the source statistics);
    ``commit`` updates the session's state from what the pass saw and the logits it
    produced. Splitting the two lets a prediction-side policy run over the normalization
    (``alpha-bn+adanpc``) and several sessions share one pass (ttaserve/batching.py)."""

    @property
    def hook(self) -> Callable[[AdaptiveBatchNorm2d, torch.Tensor], torch.Tensor] | None: ...

    def commit(self, logits: torch.Tensor) -> None: ...


@runtime_checkable
class NormalizationPolicy(Adapter, Protocol):
    """A policy whose whole effect is how BatchNorm layers normalize (alpha-bn, unmix-tns,
    graded-bn): it can sit under a prediction-side policy in a composition."""

    def normalization(self, model: PreparedModel, state: TensorState, x: torch.Tensor) -> Normalization:
        """The normalizer of the forward pass of ``x`` over ``state`` (read now, updated on
        commit)."""


@runtime_checkable
class FeaturePolicy(Adapter, Protocol):
    """A policy that predicts from the classifier head's input of a forward pass with
    source statistics (adanpc): requests of several sessions share that pass, and the
    policy answers them together (ttaserve/batching.py)."""

    def predict_features(self, model: PreparedModel,
                         parts: list[tuple[torch.Tensor, TensorState, bool]]) -> list[torch.Tensor]:
        """Each (features, state, adapt) part's scores, as :meth:`Adapter.forward` would give
        them for its batch; states updated where adapt."""


class StatelessNormalization:
    """A normalization that keeps nothing between batches (alpha-bn, tbn; ``None``: the
    source statistics)."""

    def __init__(self, hook: Callable[[AdaptiveBatchNorm2d, torch.Tensor], torch.Tensor] | None) -> None:
        self.hook = hook

    def commit(self, logits: torch.Tensor) -> None:
        """Nothing to remember."""


def run_normalized(norm: Normalization, model: PreparedModel, x: torch.Tensor, adapt: bool) -> torch.Tensor:
    """The forward of a normalization policy: predict with ``norm``, then commit if adapting."""
    with torch.no_grad():
        with normalizer(norm.hook):
            logits = model(x)
        if adapt:
            norm.commit(logits)
    return logits
