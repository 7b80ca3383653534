"""The models a server holds: each with its wire spec, its Engine and a worker thread.

Forward passes never run on the asyncio event loop: each model has its own executor
(one thread by default, so a model's forwards run one at a time in arrival order)."""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ttaserve.engine import BatchReport, Engine, PolicyChoice
from ttaserve.errors import NotFound
from ttaserve.handlers.loader import LoadedModel
from ttaserve.handlers.spec import ModelSpec
from ttaserve.server.convert import InferRequest
from ttaserve.server.metrics import ServerMetrics
from ttaserve.sessions import Session, SessionLimits


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
    ) -> None:
        self.spec: ModelSpec = loaded.spec
        self.metrics = metrics
        self.engine = Engine(
            loaded.model,
            loaded.policy or default_policy,
            limits=limits,
            on_drop=self._session_dropped,
            monitor=self._observe_batch,
            **(loaded.params if loaded.policy else default_params),
        )
        self.stats = Statistics()
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"model-{self.spec.name}")

    @property
    def name(self) -> str:
        return self.spec.name

    async def infer(self, request: InferRequest) -> tuple[dict[str, np.ndarray], str]:
        """Run the request on the model's worker; returns (outputs, policy used)."""
        enqueued = time.perf_counter_ns()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._infer_sync, request, enqueued)

    def _infer_sync(self, request: InferRequest, enqueued: int) -> tuple[dict[str, np.ndarray], str]:
        started = time.perf_counter_ns()
        self.metrics.queue_seconds.labels(self.name).observe((started - enqueued) / 1e9)
        (array,) = request.inputs.values()
        with warnings.catch_warnings():  # a read-only view: policies never write their input
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(array)
        policy = self._policy_of(request)
        with torch.inference_mode(False):
            logits = self.engine.predict(
                x, request.sequence_id, adapt=request.adapt, policy=request.policy,
                start=request.start, end=request.end,
            )
        done = time.perf_counter_ns()
        self._observe(x.shape[0], started - enqueued, done - started, policy)
        (out_name,) = (t.name for t in self.spec.outputs)
        return {out_name: logits.detach().numpy()}, policy

    def _policy_of(self, request: InferRequest) -> str:
        if request.sequence_id is not None:
            session = self.engine.sessions.get(request.sequence_id)
            if session is not None and not request.start:
                return session.policy
        if request.policy:
            return PolicyChoice.of(request.policy).name
        return self.engine.default.name

    def _observe(self, batch: int, queue_ns: int, compute_ns: int, policy: str) -> None:
        s = self.stats
        s.inference_count += batch
        s.execution_count += 1
        s.queue_ns += queue_ns
        s.compute_ns += compute_ns
        s.last_inference_ms = int(time.time() * 1000)
        entry = s.batch_counts.setdefault(batch, [0, 0])
        entry[0] += 1
        entry[1] += compute_ns
        self.metrics.compute_seconds.labels(self.name, policy).observe(compute_ns / 1e9)
        self.metrics.batch_size.labels(self.name).observe(batch)
        self.metrics.live_sessions.labels(self.name).set(len(self.engine.sessions))

    def _observe_batch(self, report: BatchReport) -> None:
        for reason in report.resets:
            self.metrics.resets.labels(self.name, report.policy, reason).inc()
        if "norm_divergence" in report.signals:
            self.metrics.batch_drift.labels(self.name, report.policy).observe(report.signals["norm_divergence"])

    def session_signals(self) -> Iterator[tuple[str, str, dict[str, float]]]:
        for session in self.engine.sessions.snapshot():
            if session.drift is not None:
                yield self.name, session.policy, dict(session.drift.signals)

    def _session_dropped(self, session: Session, reason: str) -> None:
        self.metrics.session_events.labels(self.name, reason).inc()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


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
            raise NotFound(f"unknown model {name!r}; this server has {sorted(self._models)}")
        if version not in ("", model.spec.version):
            raise NotFound(f"model {name!r} has no version {version!r}; it has {model.spec.version!r}")
        return model
