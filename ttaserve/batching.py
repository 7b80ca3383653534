"""Cross-session batching: the pieces :meth:`ttaserve.engine.Engine.predict_many` uses to
predict several requests with as few forward passes as the policies allow.

A request joins a *shared* forward pass when its policy acts only through BatchNorm
(:func:`segment_normalization`: ``source``, ``alpha-bn``/``tbn``, ``unmix-tns``,
``graded-bn``), whatever its session and whatever the other requests' policies. The
convolutions and the head run once over the whole batch; every BatchNorm layer hands each
request's *segment* to that request's own normalizer (:class:`SegmentedNorm`), which
computes its statistics from that segment and that session's state only, so no request
sees another's samples or state. Each session commits its own update afterwards. A shared
forward gives each request what it would get alone up to float rounding: CPU convolution
kernels may sum in a different order for a different batch size, so outputs agree to
~1e-6 (tested at 1e-5 per policy) rather than bit for bit.

A request of a policy that predicts from the classifier head's input of a source pass
(:class:`~ttaserve.adapters.base.FeaturePolicy`: ``adanpc``) joins the same pass with the
source statistics for its segment; afterwards the policy answers all such requests of the
pass together: the shared source memory is searched once for all their features (one
matrix product and top-k), each session's own test memory only for its own rows.

Requests of other policies (gradient and merging policies, compositions) run one at a
time, in arrival order, through the same per-session code as a lone request.
A session with two requests in one batch sees them in arrival order: the second waits for
the next pass (:func:`rounds`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ttaserve.adapters.alpha_bn import AlphaBNNorm
from ttaserve.adapters.base import Normalization, TensorState
from ttaserve.adapters.model import AdaptiveBatchNorm2d, NormHook
from ttaserve.sessions import SequenceId, Session


@dataclass
class Request:
    """One request to an engine: a batch, its session (None: adapt on this batch alone and
    keep nothing) and the request parameters."""

    x: torch.Tensor
    session: SequenceId | None = None
    adapt: bool = True
    policy: str | None = None  # tta_policy: only on a session's first request (or with start)
    start: bool = False
    end: bool = False


@dataclass(frozen=True)
class Prediction:
    """A request's logits and the policy that produced them (``source`` while a session's
    safety net has it answered by the source model)."""

    logits: torch.Tensor
    policy: str


Result = Prediction | Exception


@dataclass
class Planned:
    """A request admitted to a shared forward pass, and what its pass found out."""

    index: int  # position in the caller's list
    request: Request
    policy: str  # the session's (or the request's) policy
    session: Session | None
    adapter: Any  # a NormalizationPolicy
    norm: Normalization | None = None  # None: answered by the source model (safety-net cooldown)
    state: TensorState = field(default_factory=TensorState)  # an unsequenced request's throwaway state
    resets_before: Counter[str] = field(default_factory=Counter)
    skipped: str | None = None  # why the outlier gate kept this batch from the state

    @property
    def sequence_id(self) -> SequenceId | None:
        return self.request.session


class _ReadsFeatures:
    """The ``norm`` of a planned feature-reading request (adanpc): its segment runs with the
    source statistics, and the policy answers from the pass's head input afterwards."""

    hook = None

    def commit(self, logits: torch.Tensor) -> None:
        """Nothing here: the policy updates its state when it answers."""


FEATURES = _ReadsFeatures()


def rounds(requests: Sequence[Request]) -> Iterator[list[int]]:
    """Request indices in passes where no session appears twice, in arrival order."""
    pending = list(range(len(requests)))
    while pending:
        taken: set[SequenceId] = set()
        now, later = [], []
        for i in pending:
            session = requests[i].session
            if session is not None and session in taken:
                later.append(i)
            else:
                now.append(i)
                if session is not None:
                    taken.add(session)
        yield now
        pending = later


def offsets_of(planned: Sequence[Planned]) -> list[int]:
    offsets = [0]
    for p in planned:
        offsets.append(offsets[-1] + p.request.x.shape[0])
    return offsets


class SegmentedNorm:
    """The normalizer of a shared pass: each request segment through its own hook (None:
    the source statistics)."""

    def __init__(self, hooks: Sequence[NormHook | None], offsets: Sequence[int]) -> None:
        self.hooks = list(hooks)
        self.spans = list(zip(offsets[:-1], offsets[1:]))

    def __call__(self, layer: AdaptiveBatchNorm2d, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer.source(z[a:b]) if hook is None else hook(layer, z[a:b])
                          for hook, (a, b) in zip(self.hooks, self.spans)])


def shared_hook(hooks: Sequence[NormHook | None], offsets: Sequence[int],
                any_hook: bool) -> tuple[bool, NormHook | None]:
    """(whether the pass can run, its normalizer). All-source passes need none; all-equal
    ``alpha-bn`` hooks become one segment-aware alpha-bn (one kernel per layer, and what a
    backend running its own graph understands); anything else needs a model that runs
    Python hooks (``any_hook``)."""
    first = hooks[0]
    if all(h is None for h in hooks):
        return True, None
    if isinstance(first, AlphaBNNorm) and first.offsets is None and all(h == first for h in hooks):
        return True, AlphaBNNorm(first.alpha, tuple(offsets))
    return any_hook, SegmentedNorm(hooks, offsets)


def segment_moments(moments: list[Any], segment: int) -> list[Any]:
    """A shared pass's per-segment moments ([S, C]) as one request's (layer, mean, var)."""
    return [(layer, mean[segment], var[segment]) for layer, mean, var in moments]
