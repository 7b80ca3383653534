"""Cross-session batching: predict several requests with as few forward passes as the
policies allow.

Requests whose policy is stateless and segment-aware (``forward_segments``: ``source``,
``alpha-bn``, ``tbn``) share one forward pass even when they belong to different
sessions; every BatchNorm layer computes its statistics per request segment
(kernels.segment_moments), never across requests. All other requests run one by one, in
arrival order. A shared forward gives each request what it would get alone up to float
rounding: CPU convolution kernels may sum in a different order for a different batch
size, so outputs agree to ~1e-6 (tested at 1e-5) rather than bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ttaserve.engine import Engine, PolicyChoice, check_input
from ttaserve.sessions import SequenceId, Session


@dataclass
class Request:
    x: torch.Tensor
    session: SequenceId | None = None
    adapt: bool = True
    policy: str | None = None
    start: bool = False
    end: bool = False


Result = torch.Tensor | Exception


def shareable(engine: Engine, choice: PolicyChoice, sequenced: bool) -> bool:
    """Whether a request may join a shared forward: a stateless, segment-aware policy, and
    no safety net to consult (sessions of adaptive policies have one; it runs per session)."""
    watched = sequenced and engine.watched(choice)
    return hasattr(engine.adapter(choice), "forward_segments") and engine.stateless(choice) and not watched


def predict_many(engine: Engine, requests: Sequence[Request]) -> list[Result]:
    """One result per request: logits, or the exception that request raised (a bad request
    never affects the others)."""
    results: list[Result | None] = [None] * len(requests)
    groups: dict[PolicyChoice, list[int]] = {}
    for i, request in enumerate(requests):
        try:
            check_input(request.x)
            choice = engine.choice_for(request.policy)
            if request.session is not None:
                live = engine.open_session(request.session, choice, request.policy is not None, request.start)
                choice = PolicyChoice(live.policy, tuple(sorted(live.params.items())))
            if len(requests) > 1 and shareable(engine, choice, request.session is not None):
                groups.setdefault(choice, []).append(i)
            else:
                results[i] = engine.predict(request.x, request.session, adapt=request.adapt,
                                            policy=None, end=request.end)
        except Exception as exc:  # reported to that request only
            results[i] = exc
    for choice, members in groups.items():
        _shared_forward(engine, choice, [requests[i] for i in members], members, results)
    return [r if r is not None else RuntimeError("request was not processed") for r in results]


def _shared_forward(engine: Engine, choice: PolicyChoice, group: list[Request], members: list[int],
                    results: list[Result | None]) -> None:
    offsets = [0]
    for request in group:
        offsets.append(offsets[-1] + request.x.shape[0])
    adapter = engine.adapter(choice)
    try:
        with engine.observed(offsets) as moments:
            logits = adapter.forward_segments(engine.model, torch.cat([r.x for r in group]), offsets)  # type: ignore[attr-defined]
    except Exception as exc:
        for i in members:
            results[i] = exc
        return
    for k, (request, i) in enumerate(zip(group, members)):
        out = logits[offsets[k]:offsets[k + 1]]
        session = engine.sessions.get(request.session) if request.session is not None else None
        if session is not None:
            _count(session, out)
        engine.report(choice.name, out, moments, {}, session, (), segment=k)
        if request.end and request.session is not None:
            engine.sessions.end(request.session)
        results[i] = out


def _count(session: Session, out: torch.Tensor) -> None:
    with session.lock:
        session.batches += 1
        session.samples += out.shape[0]
        session.last_active = time.monotonic()
