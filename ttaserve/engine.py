"""In-process API: one model, its default policy and its sessions. The server, the
benchmarks and the tests all predict through :meth:`Engine.predict` (one batch) or
:meth:`Engine.predict_many` (several requests, batched across sessions)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ttaserve import snapshot
from ttaserve.adapters import Adapter, PreparedModel, canonical, create_adapter, prepare
from ttaserve.adapters.base import TensorState
from ttaserve.adapters.guard import CollapseGuard, GuardConfig, all_finite
from ttaserve.adapters.model import MomentLog, normalizer, observe_moments
from ttaserve.adapters.safety import Reason, SafetyConfig, SafetyNet
from ttaserve.batching import (
    FEATURES,
    Planned,
    Prediction,
    Request,
    Result,
    offsets_of,
    rounds,
    segment_moments,
    shared_hook,
)
from ttaserve.drift import DriftTracker, divergence_rows
from ttaserve.errors import InvalidInput, NotFound
from ttaserve.outliers import OutlierConfig, outlier_reason
from ttaserve.sessions import SequenceId, Session, SessionLimits, SessionStore


@dataclass(frozen=True)
class BatchReport:
    """What one forward pass looked like, for metrics: the policy, the batch size, this
    batch's drift signals and any resets it caused (by reason)."""

    policy: str
    batch: int
    signals: dict[str, float]
    resets: tuple[str, ...] = ()
    skipped: str | None = None  # why this batch's update was rolled back (ttaserve/outliers.py)
    fallback: str | None = None  # why the safety net switched the session to source after it


@dataclass(frozen=True)
class PolicyChoice:
    """A policy name (canonical, aliases resolved) and its parameters."""

    name: str
    params: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, name: str, params: dict[str, Any] | None = None) -> PolicyChoice:
        target, merged = canonical(name, params)
        return cls(target, tuple(sorted(merged.items())))


class Engine:
    """Serve one model under a default policy, with per-session adaptation state.

    >>> engine = Engine(ttaserve.models.demo(), policy="alpha-bn", alpha=0.1)
    >>> logits = engine.predict(x, session="cam-1")

    Every session of a stateful policy is watched by a :class:`CollapseGuard` (``guard``
    configures it; ``GuardConfig(enabled=False)`` turns it off): when its adaptation
    collapses or its state turns non-finite, the session is reset to the policy's initial
    state and ``session.resets[reason]`` is incremented. Each session also keeps drift
    signals (:class:`ttaserve.drift.DriftTracker`); ``track_drift=False`` skips them (they
    never change a prediction, and the accuracy benchmark saves their cost).
    """

    def __init__(
        self,
        model: nn.Module | PreparedModel,
        policy: str = "source",
        *,
        limits: SessionLimits = SessionLimits(),
        on_drop: Callable[[Session, str], None] | None = None,
        guard: GuardConfig = GuardConfig(),
        monitor: Callable[[BatchReport], None] | None = None,
        track_drift: bool = True,
        outliers: OutlierConfig = OutlierConfig(),
        safety: SafetyConfig = SafetyConfig(),
        **params: Any,
    ) -> None:
        self.model = model if isinstance(model, PreparedModel) else prepare(model)
        self.guard = guard
        self.outliers = outliers
        self.safety = safety
        self.monitor = monitor
        self.track_drift = track_drift
        self.fingerprint = model_fingerprint(self.model)
        self._adapters: dict[PolicyChoice, Adapter] = {}
        self.default = self._validated(PolicyChoice.of(policy, params))
        self.sessions = SessionStore(limits, on_drop)

    # -- policies ---------------------------------------------------------------------
    def adapter(self, choice: PolicyChoice) -> Adapter:
        """The (cached, immutable) policy object for a choice."""
        if choice not in self._adapters:
            # Validated first, then bound: the model checks that the policy fits it (and a
            # backend such as ONNX Runtime may refuse policies it cannot run).
            adapter = create_adapter(choice.name, **dict(choice.params))
            self._adapters[choice] = self.model.bind(adapter)
        return self._adapters[choice]

    def _validated(self, choice: PolicyChoice) -> PolicyChoice:
        self.adapter(choice)
        return choice

    def set_default_policy(self, policy: str, **params: Any) -> PolicyChoice:
        """Policy for sessions created from now on; live sessions keep theirs."""
        self.default = self._validated(PolicyChoice.of(policy, params))
        return self.default

    def set_session_policy(self, sequence_id: SequenceId, policy: str, **params: Any) -> Session:
        """Switch (or create) a session's policy; its state starts fresh."""
        choice = self._validated(PolicyChoice.of(policy, params))
        session, _ = self.sessions.open(sequence_id, True, lambda: self._new_session(sequence_id, choice))
        return session

    def reset(self, sequence_id: SequenceId, reason: str = "request") -> Session | None:
        """Restore a session's state to its policy's initial state."""
        session = self.sessions.get(sequence_id)
        if session is not None:
            with session.lock:
                self._reset_locked(session, reason)
        return session

    def _reset_locked(self, session: Session, reason: str) -> None:
        self._fresh_state(session)
        if session.safety is not None:
            session.safety.state = session.safety.init_state()
        session.resets[reason] += 1

    def _fresh_state(self, session: Session) -> None:
        session.state = session.adapter.init_state(self.model)
        session.drift = None  # signals restart with the state
        if session.guard is not None:
            session.guard.reset()

    # -- prediction -------------------------------------------------------------------
    def predict(
        self,
        x: torch.Tensor,
        session: SequenceId | None = None,
        *,
        adapt: bool = True,
        policy: str | None = None,
        start: bool = False,
        end: bool = False,
    ) -> torch.Tensor:
        """Logits for ``x``; updates the session's state unless ``adapt`` is False.

        ``session=None`` adapts on this batch alone and keeps nothing. ``policy`` may only
        be given on a session's first request (or with ``start``)."""
        return self.run(Request(x, session, adapt, policy, start, end)).logits

    def run(self, request: Request) -> Prediction:
        """:meth:`predict` for a :class:`Request`, with the policy that answered it."""
        x = request.x
        check_input(x)
        choice = self.choice_for(request.policy)
        if request.session is None:
            adapter = self.adapter(choice)
            state = adapter.init_state(self.model)
            with self.observed() as moments:
                logits = adapter.forward(self.model, x, state, request.adapt)
            self.report(choice.name, logits, moments, adapter.signals(state), None, ())
            return Prediction(logits, choice.name)
        live = self.open_session(request.session, choice, request.policy is not None, request.start)
        return self._run_open(live, request)

    def _run_open(self, live: Session, request: Request) -> Prediction:
        """A request of an opened session; ends the session afterwards if it asks to."""
        try:
            return self._run(live, request.x, request.adapt)
        finally:
            if request.end and request.session is not None:
                self.sessions.end(request.session)

    def predict_many(self, requests: Sequence[Request]) -> list[Result]:
        """One result per request, in order: a :class:`Prediction`, or the exception that
        request raised (a bad request never affects the others). Requests whose policies
        act through BatchNorm share forward passes across sessions; the rest run alone
        (ttaserve/batching.py). Each gets what it would get alone, up to float rounding."""
        results: list[Result | None] = [None] * len(requests)
        for indices in rounds(requests):
            shared: list[Planned] = []
            for i in indices:
                try:
                    planned = self._plan(i, requests[i]) if len(indices) > 1 else self.run(requests[i])
                    if isinstance(planned, Planned):
                        shared.append(planned)
                    else:
                        results[i] = planned
                except Exception as exc:  # reported to that request only
                    results[i] = exc
            if shared:
                self._run_shared(shared, results)
        return [r if r is not None else RuntimeError("request was not processed") for r in results]

    def choice_for(self, policy: str | None) -> PolicyChoice:
        """The policy a request asks for (``tta_policy``), or the model's default."""
        return self.default if policy is None else self._validated(PolicyChoice.of(policy))

    def open_session(self, sequence_id: SequenceId, choice: PolicyChoice, explicit: bool,
                     start: bool) -> Session:
        """The live session for a request (created on start or first sight)."""
        live, created = self.sessions.open(sequence_id, start, lambda: self._new_session(sequence_id, choice))
        if not created and explicit and live.policy != choice.name:
            raise InvalidInput(
                f"sequence {sequence_id!r} already runs policy {live.policy!r}; tta_policy can only "
                "be chosen on a sequence's first request (or use SetPolicy to switch it)"
            )
        return live

    def _plan(self, index: int, request: Request) -> Planned | Prediction:
        """Admit a request to the round's shared forward pass, or run it alone now (its
        policy cannot share)."""
        check_input(request.x)
        choice = self.choice_for(request.policy)
        if request.session is None:
            adapter = self.adapter(choice)
            if not shares_passes(adapter):
                return self.run(request)
            return Planned(index, request, choice.name, None, adapter)
        live = self.open_session(request.session, choice, request.policy is not None, request.start)
        if shares_passes(live.adapter):
            return Planned(index, request, live.policy, live, live.adapter)
        return self._run_open(live, request)

    def _run_shared(self, planned: list[Planned], results: list[Result | None]) -> None:
        """One forward pass for the round's shareable requests. A request whose normalizer
        cannot be built fails alone; a round left with one request, whose normalizers this
        model cannot combine, or whose pass raised (nothing is committed before the pass
        ends) runs its requests one by one."""
        if len(planned) > 1:
            with contextlib.ExitStack() as locks:
                for p in sorted((p for p in planned if p.session is not None), key=lambda p: repr(p.sequence_id)):
                    locks.enter_context(p.session.lock)  # type: ignore[union-attr]
                planned, hooks = self._normalized(planned, results)
                offsets = offsets_of(planned)
                runs, hook = shared_hook(hooks, offsets, self.model.runs_hooks) if planned else (True, None)
                if runs and (not planned or self._forward_shared(planned, hook, offsets, results)):
                    return
        for p in planned:
            try:
                results[p.index] = self._run_open(p.session, p.request) if p.session is not None else self.run(p.request)
            except Exception as exc:  # reported to that request only
                results[p.index] = exc

    def _normalized(self, planned: list[Planned], results: list[Result | None]) -> tuple[list[Planned], list[Any]]:
        """The requests whose normalizer could be built, and their hooks; the others fail alone."""
        kept, hooks = [], []
        for p in planned:
            try:
                hooks.append(self._normalization(p))
                kept.append(p)
            except Exception as exc:  # reported to that request only
                results[p.index] = exc
                self._end_if_asked(p)
        return kept, hooks

    def _normalization(self, p: Planned) -> Any:
        """A planned request's normalizer (under its session's lock); None: source statistics."""
        features = reads_features(p.adapter)
        if p.session is None:
            p.state = p.adapter.init_state(self.model)
            p.norm = FEATURES if features else p.adapter.normalization(self.model, p.state, p.request.x)
        elif p.session.safety is not None and p.session.safety.falling_back:
            p.norm = None  # the safety net's cooldown: answered by the source model
        else:
            p.norm = FEATURES if features else p.adapter.normalization(self.model, p.session.state, p.request.x)
        return p.norm.hook if p.norm is not None else None

    def _forward_shared(self, planned: list[Planned], hook: Any, offsets: list[int],
                        results: list[Result | None]) -> bool:
        """The shared pass and each request's settling; False if the pass itself raised."""
        gate = self.outliers.enabled and any(p.request.adapt for p in planned)
        readers = any(p.norm is FEATURES for p in planned)
        try:
            with torch.no_grad(), normalizer(hook), self.observed(offsets, gate=gate) as moments:
                x = torch.cat([p.request.x for p in planned])
                features, logits = self.model.features_and_logits(x) if readers else (None, self.model(x))
        except Exception:  # e.g. one request's input the model cannot take: each runs alone
            return False
        settled: list[torch.Tensor | Exception] = []
        for k, (p, (a, b)) in enumerate(zip(planned, zip(offsets[:-1], offsets[1:]))):
            try:
                settled.append(self._settle(p, logits[a:b], segment_moments(moments, k)))
            except Exception as exc:  # e.g. a session whose state broke: that request only
                settled.append(exc)
        if features is not None:
            self._read_features(planned, features, offsets, settled)
        checks = [0 if isinstance(out, Exception) else self._due_checks(p, out) for p, out in zip(planned, settled)]
        wanted = [p.request.x[:n] for p, n in zip(planned, checks) if n]
        source = iter(torch.split(self.source_logits(torch.cat(wanted)), [w.shape[0] for w in wanted])) if wanted else iter(())
        for k, (p, out, n) in enumerate(zip(planned, settled, checks)):
            try:
                if isinstance(out, Exception):
                    results[p.index] = out
                    continue
                fallback = self._verdict(p.session, out[:n], next(source)) if n else None
                results[p.index] = self._book(p, out, moments, k, fallback)
            finally:
                self._end_if_asked(p)
        return True

    def _read_features(self, planned: list[Planned], features: torch.Tensor, offsets: list[int],
                       settled: list[torch.Tensor | Exception]) -> None:
        """The answers of the pass's feature-reading requests (adanpc), each group of equal
        policies in one call (one search of the shared source memory), then each one's
        collapse guard. A call that raises fails only the requests of its group."""
        groups: dict[Any, list[int]] = {}
        for k, p in enumerate(planned):
            if p.norm is FEATURES and not isinstance(settled[k], Exception):
                groups.setdefault(p.adapter, []).append(k)
        for adapter, members in groups.items():
            adapts = [planned[k].request.adapt and planned[k].skipped is None for k in members]
            try:
                parts = [(features[offsets[k]:offsets[k + 1]], self._state_of(planned[k]), adapt)
                         for k, adapt in zip(members, adapts)]
                answers = adapter.predict_features(self.model, parts)
            except Exception as exc:  # reported to the group's requests only
                for k in members:
                    settled[k] = exc
                continue
            for k, adapt, scores in zip(members, adapts, answers):
                p = planned[k]
                try:
                    settled[k] = scores if p.session is None else self._guarded(p.session, p.request.x, scores, adapt)
                except Exception as exc:
                    settled[k] = exc

    @staticmethod
    def _state_of(p: Planned) -> TensorState:
        return p.session.state if p.session is not None else p.state

    def _settle(self, p: Planned, logits: torch.Tensor, moments: list[Any]) -> torch.Tensor:
        """A shared pass's segment, as :meth:`_run` treats a lone batch up to the safety
        check: outlier gate, commit, collapse guard (a feature-reading request: the gate
        only; it is answered and guarded by :meth:`_read_features`)."""
        session, request = p.session, p.request
        if p.norm is None:
            return logits
        if session is None:
            if request.adapt:
                p.norm.commit(logits)
            return logits
        p.resets_before = session.resets.copy()
        gated = request.adapt and self.outliers.enabled and len(session.state) > 0
        p.skipped = outlier_reason(request.x, moments, self.outliers) if gated else None
        if request.adapt and p.skipped is None:
            p.norm.commit(logits)
        elif p.skipped is not None:  # not committed: the state is as before this batch
            session.skipped[p.skipped] += 1
            if not all_finite(session.state):  # broken before this batch: still reset
                self._reset_locked(session, "non_finite")
        if p.norm is FEATURES:
            return logits  # replaced by the policy's answer
        return self._guarded(session, request.x, logits, request.adapt and p.skipped is None)

    def _due_checks(self, p: Planned, logits: torch.Tensor) -> int:
        """How many of a segment's leading samples the safety net wants to see through source."""
        session = p.session
        if session is None or p.norm is None or session.safety is None:
            return 0
        if not p.request.adapt or p.skipped is not None:
            return 0
        return session.safety.samples_to_check(logits.shape[0])

    def _book(self, p: Planned, logits: torch.Tensor, moments: list[Any], segment: int,
              fallback: Reason | None) -> Prediction:
        """Counters, drift signals and the monitor for one segment of a shared pass."""
        session = p.session
        if session is None:
            self.report(p.policy, logits, moments, p.adapter.signals(p.state), None, (), segment=segment)
            return Prediction(logits, p.policy)
        if p.norm is None:
            return self._answered_from_source(session, logits, moments, segment)
        self._count(session, logits)
        caused = tuple((session.resets - p.resets_before).elements())
        self.report(session.policy, logits, moments, self._signals(session), session, caused,
                    segment=segment, skipped=p.skipped, fallback=fallback)
        return Prediction(logits, session.policy)

    def _end_if_asked(self, p: Planned) -> None:
        if p.request.end and p.request.session is not None:
            self.sessions.end(p.request.session)

    @staticmethod
    def _count(session: Session, logits: torch.Tensor) -> None:
        session.batches += 1
        session.samples += logits.shape[0]
        session.last_active = time.monotonic()

    def _signals(self, session: Session) -> dict[str, float]:
        """A session's policy, guard and safety-net signals, for the monitor."""
        extra = session.adapter.signals(session.state)
        if session.guard is not None:
            extra = {**extra, **{f"guard_{k}": v for k, v in session.guard.signals().items()}}
        if session.safety is not None:
            extra = {**extra, **{f"safety_{k}": v for k, v in session.safety.signals().items()}}
        return extra

    def _run(self, session: Session, x: torch.Tensor, adapt: bool) -> Prediction:
        with session.lock:
            if session.safety is not None and session.safety.falling_back:
                return self._run_fallback(session, x)
            resets_before = session.resets.copy()
            gated = adapt and self.outliers.enabled and len(session.state) > 0
            before = session.state.state_dict() if gated else None
            with self.observed(gate=gated) as moments:
                logits = session.adapter.forward(self.model, x, session.state, adapt)
            skipped = outlier_reason(x, moments, self.outliers) if gated else None
            if skipped is not None and before is not None:  # roll this batch's update back
                session.state.load_state_dict(before)
                session.skipped[skipped] += 1
                if not all_finite(session.state):  # broken before this batch: still reset
                    self._reset_locked(session, "non_finite")
            logits = self._guarded(session, x, logits, adapt and skipped is None)
            fallback = self._checked(session, x, logits) if adapt and skipped is None else None
            self._count(session, logits)
            caused = tuple((session.resets - resets_before).elements())
            self.report(session.policy, logits, moments, self._signals(session), session, caused,
                        skipped=skipped, fallback=fallback)
        return Prediction(logits, session.policy)

    def _checked(self, session: Session, x: torch.Tensor, logits: torch.Tensor) -> str | None:
        """Show the safety net the batch's leading samples through the source model too;
        on its verdict, reset the state and answer from source for a cooldown."""
        net = session.safety
        count = net.samples_to_check(x.shape[0]) if net is not None else 0
        if net is None or count == 0:
            return None
        return self._verdict(session, logits[:count], self.source_logits(x[:count]))

    def _verdict(self, session: Session | None, adapted: torch.Tensor, source: torch.Tensor) -> Reason | None:
        assert session is not None and session.safety is not None
        reason = session.safety.observe(adapted, source)
        if reason is not None:
            self._fresh_state(session)
            session.fallbacks[reason] += 1
            session.safety.fall_back()
        return reason

    def _run_fallback(self, session: Session, x: torch.Tensor) -> Prediction:
        """A batch of a session in its safety-net cooldown: the source model answers."""
        with self.observed() as moments:  # drift signals still see the data
            logits = self.source_logits(x)
        return self._answered_from_source(session, logits, moments)

    def _answered_from_source(self, session: Session, logits: torch.Tensor, moments: list[Any],
                              segment: int | None = None) -> Prediction:
        """Book a batch the source model answered during the session's cooldown."""
        assert session.safety is not None
        session.safety.served_from_source(logits.shape[0])
        self._count(session, logits)
        self.report("source", logits, moments, session.safety.signals(), session, (), segment=segment)
        return Prediction(logits, "source")

    def source_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model exactly as trained (source statistics), no state involved."""
        with torch.no_grad(), normalizer(None):
            return self.model(x)

    def observed(self, offsets: list[int] | None = None, gate: bool = False) -> Any:
        """Context collecting the BN-input moments of one forward (per request segment with
        ``offsets``) when drift signals or the outlier gate need them."""
        return observe_moments(offsets) if self.track_drift or gate else contextlib.nullcontext([])

    def report(self, policy: str, logits: torch.Tensor, moments: list[Any], extra: dict[str, float],
                session: Session | None, resets: tuple[str, ...], segment: int | None = None,
                skipped: str | None = None, fallback: str | None = None) -> None:
        """Fold one forward's outputs into the session's drift signals and tell the monitor."""
        if not self.track_drift and self.monitor is None:
            return
        tracker = session.drift if session is not None else None
        if tracker is None:
            tracker = DriftTracker(self.model.num_classes or logits.shape[1])
            if session is not None:
                session.drift = tracker
        signals = tracker.update(logits, layer_divergence(moments, segment), extra)
        if self.monitor is not None:
            self.monitor(BatchReport(policy, logits.shape[0], {**extra, **signals}, resets, skipped, fallback))

    # -- observation and snapshots ----------------------------------------------------
    def signals_of(self, session: Session) -> dict[str, float]:
        """The session's drift signals (EMAs), policy-specific ones included."""
        return dict(session.drift.signals) if session.drift is not None else {}

    def layer_divergence_of(self, session: Session) -> dict[str, float]:
        """The session's latest per-layer BN divergence (see :func:`layer_divergence`)."""
        return dict(session.drift.layers) if session.drift is not None else {}

    def snapshot(self, sequence_id: SequenceId) -> bytes:
        """The session's policy, state and counters as versioned, checksummed bytes."""
        session = self.sessions.get(sequence_id)
        if session is None:
            raise NotFound(f"no live session {sequence_id!r}")
        return self.snapshot_of(session)

    def snapshot_of(self, session: Session) -> bytes:
        """:meth:`snapshot` of a session object (also one that already left the store)."""
        with session.lock:
            tensors = {f"state.{k}": v for k, v in session.state.state_dict().items()}
            if session.guard is not None:
                tensors.update({f"guard.{k}": v for k, v in session.guard.state.state_dict().items()})
            if session.safety is not None:
                tensors.update({f"safety.{k}": v for k, v in session.safety.state.state_dict().items()})
            meta = {
                "model": self.fingerprint, "policy": session.policy, "params": session.params,
                "batches": session.batches, "samples": session.samples,
                "resets": dict(session.resets), "skipped": dict(session.skipped),
                "fallbacks": dict(session.fallbacks),
                "created": session.created,
                "signals": self.signals_of(session),
            }
        return snapshot.encode(meta, tensors)

    def restore(self, sequence_id: SequenceId, data: bytes) -> Session:
        """Replace (or create) a session from :meth:`snapshot` bytes; nothing changes if the
        bytes are corrupt or were taken from a different model."""
        meta, tensors = snapshot.decode(data)
        if meta.get("model") != self.fingerprint:
            raise InvalidInput("this snapshot was taken from a different model (architecture "
                               "fingerprint mismatch); restore it on a replica of that model")
        choice = self._validated(PolicyChoice.of(meta["policy"], meta.get("params", {})))
        session = self._new_session(sequence_id, choice)
        try:
            session.state.load_state_dict(_section(tensors, "state."))
            if session.guard is not None:
                session.guard.state.load_state_dict(_section(tensors, "guard."))
            if session.safety is not None:
                session.safety.state.load_state_dict(_section(tensors, "safety."))
        except ValueError as exc:
            raise InvalidInput(f"snapshot does not fit policy {choice.name!r}: {exc}") from exc
        session.batches, session.samples = int(meta["batches"]), int(meta["samples"])
        session.resets.update(meta.get("resets", {}))
        session.skipped.update(meta.get("skipped", {}))
        session.fallbacks.update(meta.get("fallbacks", {}))
        session.created = float(meta.get("created", session.created))
        session.drift = DriftTracker(self.model.num_classes, signals=dict(meta.get("signals", {})))
        self.sessions.open(sequence_id, True, lambda: session)
        return session

    def _guarded(self, session: Session, x: torch.Tensor, logits: torch.Tensor, adapt: bool) -> torch.Tensor:
        """Show an adapted batch to the session's guard and reset on its verdict.

        Non-finite logits are never returned: they can only come from a broken state (the
        logits precede the update), so after the reset the batch is predicted again from the
        fresh state (adapting on it if ``adapt``). ``adapt=False`` batches are not recorded
        in the signals; they are only checked for finiteness."""
        guard = session.guard
        if guard is None:
            return logits
        finite = bool(torch.isfinite(logits).all())
        reason = guard.observe(logits, session.state) if adapt else (None if finite else "non_finite")
        if reason is None:
            return logits
        self._reset_locked(session, reason)
        if finite:
            return logits
        logits = session.adapter.forward(self.model, x, session.state, adapt)
        if adapt and guard.observe(logits, session.state) == "non_finite":
            self._reset_locked(session, "non_finite")  # this batch's own update broke the state
        if not bool(torch.isfinite(logits).all()):
            raise InvalidInput("the model's output is not finite for this input, even from a fresh state")
        return logits

    def _new_session(self, sequence_id: SequenceId, choice: PolicyChoice) -> Session:
        adapter = self.adapter(choice)
        state = adapter.init_state(self.model)
        # Stateless policies (empty state) have nothing to reset, so they are not watched.
        guard = CollapseGuard(self.guard) if self.guard.enabled and len(state) else None
        # Every adaptive policy is watched by the safety net; source has nothing to fall back from.
        safety = SafetyNet(self.safety, self.model.num_classes) if self.watched(choice) else None
        return Session(sequence_id, choice.name, dict(choice.params), adapter, state, guard=guard,
                       safety=safety)

    def watched(self, choice: PolicyChoice) -> bool:
        """Whether sessions of this policy carry a safety net."""
        return self.safety.enabled and choice.name != "source"


def shares_passes(adapter: Adapter) -> bool:
    """Whether a policy's requests share forward passes with other requests and sessions
    (ttaserve/batching.py): it acts through BatchNorm, or reads the head input of a source pass."""
    return _kind(type(adapter)) != ""


def reads_features(adapter: Adapter) -> bool:
    """Whether a policy answers from the head input of a source pass
    (:class:`ttaserve.adapters.base.FeaturePolicy`)."""
    return _kind(type(adapter)) == "features"


@functools.cache
def _kind(cls: type) -> str:
    # The method that makes a policy a FeaturePolicy / NormalizationPolicy (the rest of those
    # protocols is the Adapter every policy is), looked up once per class: a runtime
    # protocol check per request cost ~20 us, as much as a small tensor operation.
    if callable(getattr(cls, "predict_features", None)):
        return "features"
    return "normalization" if callable(getattr(cls, "normalization", None)) else ""


def _section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def layer_divergence(moments: list[Any], segment: int | None = None) -> dict[str, float]:
    """Per BN layer: mean over channels of the symmetric KL between the batch's and the
    source statistics (averaged when a layer ran more than once in the pass). With
    ``segment``, moments were recorded per segment ([S, C]) and row ``segment`` is used;
    the rows of all segments are computed together once per pass (:class:`MomentLog`)."""
    if not moments:  # nothing observed (drift signals off): no layer to report
        return {}
    if isinstance(moments, MomentLog):
        if moments.divergence is None:
            moments.divergence = divergence_rows(moments)
        rows = moments.divergence
    else:
        rows = divergence_rows(moments)
    return rows[segment or 0]


def model_fingerprint(model: PreparedModel) -> str:
    """Identifies an architecture (parameter and buffer names and shapes), not its weights."""
    return hashlib.sha256(model.architecture().encode()).hexdigest()[:16]


def check_input(x: torch.Tensor) -> None:
    """Reject what no policy can handle, before any state is touched."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise InvalidInput("input must be a floating-point tensor")
    if x.dim() < 2 or x.shape[0] == 0:
        raise InvalidInput(f"input must be a non-empty batch [B, ...], got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise InvalidInput("input contains NaN or Inf; send finite values")
