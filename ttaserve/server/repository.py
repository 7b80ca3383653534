"""The models a server holds: each with its wire spec, its Engine and a worker thread.

Forward passes never run on the asyncio event loop: each model has its own executor
(one thread by default, so a model's forwards run one at a time in arrival order).

Shutdown is truthful: once a model is closed (:meth:`ServedModel.close`), a request that has not
started its forward pass is answered UNAVAILABLE without being run, so a request is applied
if and only if it is answered OK and a client may safely retry every UNAVAILABLE."""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ttaserve.adapters import Unsupported
from ttaserve.adapters.safety import SafetyConfig
from ttaserve.batching import Prediction, Request
from ttaserve.engine import BatchReport, Engine
from ttaserve.errors import DeadlineExceeded, NotFound, Overloaded, Unavailable, shown
from ttaserve.handlers.loader import LoadedModel
from ttaserve.handlers.spec import ModelSpec
from ttaserve.outliers import OutlierConfig
from ttaserve.server.convert import InferRequest
from ttaserve.server.metrics import ServerMetrics
from ttaserve.server.persistence import SessionPersistence
from ttaserve.server.scheduler import Batcher
from ttaserve.server.session_memory import SessionMemory
from ttaserve.sessions import SequenceId, Session, SessionLimits

log = logging.getLogger(__name__)


@dataclass
class Statistics:
    """Counters reported by ModelStatistics (Triton's field meanings)."""

    inference_count: int = 0  # samples
    execution_count: int = 0  # forward passes
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    last_inference_ms: int = 0
    batch_counts: dict[int, list[int]] = field(default_factory=dict)  # size -> [count, ns]


class ServedModel:
    def __init__(
        self,
        loaded: LoadedModel,
        default_policy: str,
        default_params: dict[str, object],
        limits: SessionLimits,
        metrics: ServerMetrics,
        workers: int = 1,
        max_batch: int = 256,
        batch_delay_s: float = 0.0,
        max_queue: int = 0,
        outliers: OutlierConfig = OutlierConfig(),
        max_session_bytes: int = 0,
        safety: SafetyConfig = SafetyConfig(),
    ) -> None:
        self.spec: ModelSpec = loaded.spec
        self.closed = False  # set at the end of the grace period: nothing new runs
        self.metrics = metrics
        self.max_queue = max_queue  # 0: unbounded
        self.pending = 0  # requests waiting for or running on the worker (event-loop owned)
        self.state_store: SessionPersistence | None = None  # --state-dir, or a replica's shared store
        self.engine = self._engine(loaded, default_policy, default_params, limits, outliers, safety)
        self.memory = SessionMemory(self.engine.sessions, max_session_bytes, self._evicted_for_memory)
        metrics.session_state_bytes.labels(self.name).set_function(lambda: self.memory.total)
        self.stats = Statistics()
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"model-{self.spec.name}")
        # Cross-session batching (off unless a delay is configured): see ttaserve/batching.py.
        self.batcher: Batcher[tuple[InferRequest, int], tuple[dict[str, np.ndarray], str]] | None = None
        if batch_delay_s > 0:
            self.batcher = Batcher(self._infer_many_sync, self._executor,
                                   lambda item: _batch_size(item[0]), max_batch, batch_delay_s)

    def _engine(self, loaded: LoadedModel, default_policy: str, default_params: dict[str, object],
                limits: SessionLimits, outliers: OutlierConfig, safety: SafetyConfig) -> Engine:
        """The model's engine under its own policy, else the server's default. A server-wide
        default that this kind of model cannot run (e.g. a gradient policy on an ONNX Runtime
        model) leaves the model on ``source`` with a warning instead of refusing to serve it."""
        def engine(policy: str, params: dict[str, Any]) -> Engine:
            return Engine(loaded.model, policy, limits=limits, on_drop=self._session_dropped,
                          monitor=self._observe_batch, outliers=outliers, safety=safety, **params)

        if loaded.policy:
            return engine(loaded.policy, loaded.params)
        try:
            return engine(default_policy, default_params)
        except Unsupported as exc:
            log.warning("model %s: the server's default policy %r does not run on it (%s); it is served "
                        "with 'source' (name a policy in its config.json)", self.spec.name, default_policy, exc)
            return engine("source", {})

    @property
    def name(self) -> str:
        return self.spec.name

    async def infer(self, request: InferRequest) -> tuple[dict[str, np.ndarray], str]:
        """Run the request on the model's worker; returns (outputs, policy used).

        Past ``max_queue`` waiting requests the request is refused (RESOURCE_EXHAUSTED);
        one whose deadline passes while it waits is not run (DEADLINE_EXCEEDED)."""
        if self.max_queue and self.pending >= self.max_queue:
            self.metrics.rejected.labels(self.name, "max_queue").inc()
            raise Overloaded(f"model {self.name!r} already has {self.pending} requests queued "
                             f"(--max-queue={self.max_queue}); retry later or add replicas")
        enqueued = time.perf_counter_ns()
        self.pending += 1
        try:
            if self.batcher is not None:
                return await self.batcher.submit((request, enqueued))
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._infer_sync, request, enqueued)
        finally:
            self.pending -= 1

    def _admit(self, request: InferRequest) -> None:
        """On the worker, right before running: drop late requests, revive evicted sessions."""
        if self.closed:
            raise Unavailable("the server shut down before this request ran; it was not applied, "
                              "retry it on another replica")
        if request.deadline is not None and time.monotonic() > request.deadline:
            self.metrics.rejected.labels(self.name, "deadline").inc()
            raise DeadlineExceeded("the request's deadline passed while it waited for the model "
                                   "(client deadline, 'timeout' parameter or --request-timeout); "
                                   "it was not run")
        if self.state_store is not None and request.sequence_id is not None:
            self.state_store.before_request(request.sequence_id, request.start)

    def _infer_many_sync(
        self, items: Sequence[tuple[InferRequest, int]]
    ) -> list[tuple[dict[str, np.ndarray], str] | Exception]:
        started = time.perf_counter_ns()
        late: dict[int, Exception] = {}
        for i, (r, _) in enumerate(items):
            try:
                self._admit(r)
            except (DeadlineExceeded, Unavailable) as exc:
                late[i] = exc
        if late:  # answered without running; the others go on as one batch
            kept = [item for i, item in enumerate(items) if i not in late]
            done_kept = iter(self._infer_many_sync(kept) if kept else [])
            return [late[i] if i in late else next(done_kept) for i in range(len(items))]
        requests = [Request(_tensor(r), r.sequence_id, r.adapt, r.policy, r.start, r.end) for r, _ in items]
        with torch.inference_mode(False):
            results = self.engine.predict_many(requests)
        if self.state_store is not None:
            for each in requests:
                self.state_store.after_request(each.session)
        for each in requests:
            if each.session is not None:
                self.memory.charge(each.session)
        done = time.perf_counter_ns()
        (out_name,) = (t.name for t in self.spec.outputs)
        out: list[tuple[dict[str, np.ndarray], str] | Exception] = []
        answered = [r for r in results if isinstance(r, Prediction)]
        for (_, enqueued), result in zip(items, results):
            self.metrics.queue_seconds.labels(self.name).observe((started - enqueued) / 1e9)
            if isinstance(result, Exception):
                out.append(result)
                continue
            out.append(({out_name: result.logits.detach().numpy()}, result.policy))
        # a shared pass's compute is booked to each policy by its share of the images
        shares: Counter[str] = Counter()
        for result in answered:
            shares[result.policy] += result.logits.shape[0]
        self._observe(sum(shares.values()), started - items[0][1], done - started, shares)
        return out

    def _infer_sync(self, request: InferRequest, enqueued: int) -> tuple[dict[str, np.ndarray], str]:
        started = time.perf_counter_ns()
        self.metrics.queue_seconds.labels(self.name).observe((started - enqueued) / 1e9)
        self._admit(request)
        x = _tensor(request)
        with torch.inference_mode(False):
            answer = self.engine.run(Request(x, request.sequence_id, request.adapt, request.policy,
                                             request.start, request.end))
        if self.state_store is not None:
            self.state_store.after_request(request.sequence_id)
        if request.sequence_id is not None:
            self.memory.charge(request.sequence_id)
        done = time.perf_counter_ns()
        self._observe(x.shape[0], started - enqueued, done - started, Counter({answer.policy: x.shape[0]}))
        (out_name,) = (t.name for t in self.spec.outputs)
        return {out_name: answer.logits.detach().numpy()}, answer.policy

    def _observe(self, batch: int, queue_ns: int, compute_ns: int, images: Counter[str]) -> None:
        """Statistics of one model execution of ``batch`` images (``images`` per policy)."""
        s = self.stats
        s.inference_count += batch
        s.execution_count += 1
        s.queue_ns += queue_ns
        s.compute_ns += compute_ns
        s.last_inference_ms = int(time.time() * 1000)
        entry = s.batch_counts.setdefault(batch, [0, 0])
        entry[0] += 1
        entry[1] += compute_ns
        for policy, count in images.items():
            self.metrics.compute_seconds.labels(self.name, policy).observe(compute_ns / 1e9 * count / max(batch, 1))
        self.metrics.batch_size.labels(self.name).observe(batch)
        self.metrics.live_sessions.labels(self.name).set(len(self.engine.sessions))

    def _observe_batch(self, report: BatchReport) -> None:
        if report.skipped is not None:
            self.metrics.updates_skipped.labels(self.name, report.policy, report.skipped).inc()
        for reason in report.resets:
            self.metrics.resets.labels(self.name, report.policy, reason).inc()
        if report.fallback is not None:
            self.metrics.fallbacks.labels(self.name, report.policy, report.fallback).inc()
        if "norm_divergence" in report.signals:
            self.metrics.batch_drift.labels(self.name, report.policy).observe(report.signals["norm_divergence"])

    def live_session(self, sequence_id: SequenceId) -> Session:
        """The live session of ``sequence_id``; NotFound (saying so) if there is none."""
        session = self.engine.sessions.get(sequence_id)
        if session is None:
            raise NotFound(f"model {self.name!r} has no live session {sequence_id!r}")
        return session

    def reset_session(self, sequence_id: SequenceId) -> Session:
        """An operator's reset (``ResetSession``, the dashboard's button): the session goes
        back to its policy's initial state and the reset is counted under reason
        ``operator``."""
        session = self.engine.reset(sequence_id, reason="operator")
        if session is None:
            raise NotFound(f"model {self.name!r} has no live session {sequence_id!r}")
        self.metrics.resets.labels(self.name, session.policy, "operator").inc()
        return session

    def session_signals(self) -> Iterator[tuple[str, str, dict[str, float]]]:
        for session in self.engine.sessions.live():
            if session.drift is not None:
                yield self.name, session.policy, dict(session.drift.signals)

    def sessions_changed(self, key: SequenceId) -> None:
        """A session was created or replaced outside a request (SetPolicy, RestoreSession,
        start-up restore): count its memory."""
        self.memory.charge(key)
        self.metrics.live_sessions.labels(self.name).set(len(self.engine.sessions))

    def close(self) -> None:
        """From now on, requests that have not started are refused without running."""
        self.closed = True

    def _evicted_for_memory(self, count: int) -> None:
        self.metrics.memory_evictions.labels(self.name).inc(count)

    def _session_dropped(self, session: Session, reason: str) -> None:
        self.memory.forget(session.sequence_id)
        self.metrics.session_events.labels(self.name, reason).inc()
        if self.state_store is not None:
            self.state_store.dropped(session, reason)

    def shutdown(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self._executor.shutdown(wait=True)


def _tensor(request: InferRequest) -> torch.Tensor:
    (array,) = request.inputs.values()
    with warnings.catch_warnings():  # a read-only view: policies never write their input
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _batch_size(request: InferRequest) -> int:
    (array,) = request.inputs.values()
    return int(array.shape[0])


class Repository:
    def __init__(self, models: list[ServedModel]) -> None:
        self._models = {m.name: m for m in models}

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._models.values())

    def has(self, name: str) -> bool:
        return name in self._models

    def get(self, name: str, version: str = "") -> ServedModel:
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"unknown model {shown(name)}; this server has {sorted(self._models)}")
        if version not in ("", model.spec.version):
            raise NotFound(f"model {name!r} has no version {shown(version)}; it has {model.spec.version!r}")
        return model
