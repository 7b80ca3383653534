"""In-process cost of every policy: time per batch relative to the source forward, bytes of
state per session, and the peak memory of one step.

Timing is paired and interleaved: in every repetition each policy's block of batches runs
next to a block of the source policy on the very same batches (the pair's order alternates
between repetitions, the policies' order is shuffled), and the ratio of the two is taken
right there. The reported overhead is the median of those per-repetition ratios, so load
from other processes, which changes over seconds, mostly cancels. Two paths are timed:

* ``engine``: :meth:`Engine.predict` with a session (drift monitoring, outlier gate,
  collapse guard and bookkeeping included), against the source policy through the engine;
* ``raw``: the policy's ``adapter.forward`` alone, against the source ``adapter.forward``.

Peak memory of a step is measured with ``torch.profiler`` (``profile_memory=True``): the
running sum of the CPU allocator's allocation and free events during one step, peak minus
start. ``tracemalloc`` does not see torch's allocator and RSS is blurred by malloc's caching,
so neither is used.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from ttaserve.adapters import Adapter, PreparedModel, TensorState, prepare
from ttaserve.adapters.safety import SafetyConfig
from ttaserve.engine import Engine

__all__ = ["POLICIES", "Subject", "bench_images", "bench_model", "measure_memory", "measure_overhead", "split"]

POLICIES = ("source", "graded-bn", "alpha-bn", "tbn", "unmix-tns", "adanpc", "t3", "t3-b", "ecotta", "tent")
SESSION = "bench"
Progress = Callable[[int, str], None]


def bench_model(adanpc_entries: int) -> PreparedModel:
    """The demo model, its AdaNPC source memory enlarged to ``adanpc_entries`` entries.

    The shipped memory (10k entries) is repeated: the search costs the same for any values,
    only the number of entries and their width count (the goal in docs/BENCHMARKS.md is stated for 60k)."""
    from ttaserve.models import demo, load_tensors

    model = prepare(demo())
    memory = load_tensors("adanpc_memory")
    n = memory["labels"].shape[0]
    copies = max(1, math.ceil(adanpc_entries / n))
    model.artifacts["adanpc.memory"] = {
        k: v.repeat(copies, *([1] * (v.dim() - 1)))[:adanpc_entries] for k, v in memory.items()
    }
    return model


def bench_images(data: str | None, count: int) -> tuple[torch.Tensor, str]:
    """The first ``count`` Fashion-MNIST test images (random pixels when the data is missing)."""
    try:
        from ttaserve.data import load_split

        return load_split("test", data)[0][:count].contiguous(), "fashion-mnist test"
    except FileNotFoundError:
        generator = torch.Generator().manual_seed(0)
        return torch.rand(count, 1, 28, 28, generator=generator), "uniform random (Fashion-MNIST not found)"


def split(images: torch.Tensor, batch: int, count: int) -> list[torch.Tensor]:
    """``count`` distinct consecutive batches (wrapping around the images)."""
    index = torch.arange(batch * count) % images.shape[0]
    return [images[index[i * batch:(i + 1) * batch]].contiguous() for i in range(count)]


def timed_safety() -> SafetyConfig:
    """The server's safety net with its source checks as served, never falling back (an
    adapted entropy 1.0 of ln C above the source's, or a marginal entropy below zero, cannot
    happen)."""
    from ttaserve.server.app import safety_config
    from ttaserve.server.settings import ServerSettings

    return replace(safety_config(ServerSettings()), entropy_margin=1.0, collapse_ratio=0.0)


@dataclass
class Subject:
    """One policy, reachable both through an Engine session and as a bare adapter."""

    name: str
    engine: Engine
    adapter: Adapter
    state: TensorState

    @classmethod
    def of(cls, model: PreparedModel, policy: str) -> Subject:
        """The policy's engine as the server builds it: with the server's default safety net
        (every adaptive policy is watched; graded-bn, the default policy, included). Its
        checks run as served but its verdicts are disabled: a session that fell back would
        be answered by source, and the policy's own cost would no longer be timed."""
        engine = Engine(model, policy, safety=timed_safety())
        adapter = engine.adapter(engine.default)
        return cls(policy, engine, adapter, adapter.init_state(model))

    def call(self, mode: str) -> Callable[[torch.Tensor], Any]:
        if mode == "engine":
            return lambda x: self.engine.predict(x, session=SESSION)
        model = self.engine.model
        return lambda x: self.adapter.forward(model, x, self.state, True)


def _block(call: Callable[[torch.Tensor], Any], batches: list[torch.Tensor], inner: int) -> float:
    """Seconds per batch over ``inner`` calls, cycling through the same batches every time."""
    start = time.perf_counter()
    for i in range(inner):
        call(batches[i % len(batches)])
    return (time.perf_counter() - start) / inner


def _summary(values: list[float]) -> dict[str, float]:
    qs = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": qs[0], "q3": qs[2]}


def _warm(subjects: dict[str, Subject], batches: list[torch.Tensor]) -> None:
    """Run each path a few times first: lazy artifacts load, the allocator warms up."""
    for subject in subjects.values():
        for mode in ("engine", "raw"):
            _block(subject.call(mode), batches, 2)


def measure_overhead(subjects: dict[str, Subject], batches: list[torch.Tensor], reps: int,
                     target_s: float, seed: int, progress: Progress) -> dict[str, Any]:
    """Per policy and path: median ratio to source (with quartiles) and ms per batch, and
    the source policy's own times (``source``: engine and bare forward, over every pair, or
    over pairs of its two paths when it is the only policy).
    A block runs ``inner`` batches, chosen so that a source block lasts about ``target_s``."""
    _warm(subjects, batches)
    source = subjects["source"]
    per_batch = _block(source.call("raw"), batches, 3)
    inner = max(1, round(target_s / max(per_batch, 1e-6)))
    samples: dict[str, dict[str, list[float]]] = {p: {} for p in subjects}
    order = [p for p in subjects if p != "source"]
    rng = random.Random(seed)
    for rep in range(reps):
        rng.shuffle(order)
        for policy in order:
            times = _pair(source, subjects[policy], batches, inner, rep % 2 == 1)
            for key, value in times.items():
                samples[policy].setdefault(key, []).append(value)
            progress(1, f"overhead b{batches[0].shape[0]}")
        if not order:
            for key, value in _source_pair(source, batches, inner, rep % 2 == 1).items():
                samples["source"].setdefault(key, []).append(value)
            progress(1, f"overhead b{batches[0].shape[0]}")
    return {"inner": inner, "source": _source_result(samples),
            "policies": {p: _policy_result(s) for p, s in samples.items() if s and p != "source"}}


def _source_pair(source: Subject, batches: list[torch.Tensor], inner: int, raw_first: bool) -> dict[str, float]:
    """The source policy's engine and bare-forward blocks back to back (nothing to compare it with)."""
    modes = ("raw", "engine") if raw_first else ("engine", "raw")
    timed = {mode: _block(source.call(mode), batches, inner) for mode in modes}
    return {"source_engine_s": timed["engine"], "source_raw_s": timed["raw"],
            "source_engine_vs_forward": timed["engine"] / timed["raw"]}


def _source_result(samples: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Source's times pooled over every pair it was timed in."""
    pooled: dict[str, list[float]] = {}
    for policy in samples.values():
        for key in ("source_engine_s", "source_raw_s", "source_engine_vs_forward"):
            pooled.setdefault(key, []).extend(policy.get(key, []))
    return {"source_engine_vs_forward": _summary(pooled["source_engine_vs_forward"]),
            "source_engine_ms": 1e3 * statistics.median(pooled["source_engine_s"]),
            "source_raw_ms": 1e3 * statistics.median(pooled["source_raw_s"])}


def _pair(source: Subject, policy: Subject, batches: list[torch.Tensor], inner: int,
          policy_first: bool) -> dict[str, float]:
    """Source and policy blocks back to back, for both paths; their ratios."""
    out: dict[str, float] = {}
    for mode in ("engine", "raw"):
        runs = [(policy.name, policy), ("source", source)]
        timed = {name: _block(s.call(mode), batches, inner)
                 for name, s in (runs if policy_first else runs[::-1])}
        out[f"{mode}_s"], out[f"source_{mode}_s"] = timed[policy.name], timed["source"]
        out[mode] = timed[policy.name] / timed["source"]
    out["engine_vs_forward"] = out["engine_s"] / out["source_raw_s"]
    out["source_engine_vs_forward"] = out["source_engine_s"] / out["source_raw_s"]
    return out


def _policy_result(samples: dict[str, list[float]]) -> dict[str, Any]:
    result: dict[str, Any] = {k: _summary(v) for k, v in samples.items() if not k.endswith("_s")}
    for key in ("engine_s", "raw_s", "source_engine_s", "source_raw_s"):
        result[key.replace("_s", "_ms")] = 1e3 * statistics.median(samples[key])
    return result


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The profiler's native code logs start/stop lines to fd 2; keep the table readable."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_step_bytes(step: Callable[[torch.Tensor], Any], x: torch.Tensor) -> int:
    """Peak bytes of torch CPU tensors alive during ``step(x)`` beyond those alive before it."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(x)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e["ts"]):
        current += int(event["args"]["Bytes"])
        peak = max(peak, current)
    return peak


def measure_memory(subjects: dict[str, Subject], x: torch.Tensor, progress: Progress) -> dict[str, Any]:
    """Per policy: state bytes of a fresh and of the benchmarked (steady) session, the
    collapse guard's bytes, the snapshot size, and the peak memory of one step."""
    out: dict[str, Any] = {}
    for name, subject in subjects.items():
        engine, model = subject.engine, subject.engine.model
        if engine.sessions.get(SESSION) is None:  # no timing ran for this policy
            engine.predict(x, session=SESSION)
        session = engine.sessions.get(SESSION)
        assert session is not None
        out[name] = {
            "state_bytes_initial": subject.adapter.init_state(model).nbytes(),
            "state_bytes_steady": session.state.nbytes(),
            "guard_bytes": session.guard.state.nbytes() if session.guard is not None else 0,
            "snapshot_bytes": len(engine.snapshot(SESSION)),
            "peak_step_bytes_engine": peak_step_bytes(subject.call("engine"), x),
            "peak_step_bytes_raw": peak_step_bytes(subject.call("raw"), x),
            "batch": x.shape[0],
        }
        progress(1, "memory")
    return out
