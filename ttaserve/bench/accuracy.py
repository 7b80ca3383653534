"""``ttaserve bench accuracy``: error of every policy on Fashion-MNIST-C streams.

Every prediction goes through :meth:`ttaserve.Engine.predict`, the code path of the server
(or, with ``via_grpc``, through the server itself: :mod:`ttaserve.bench.accuracy_grpc`).
Each episode of a stream (:mod:`ttaserve.bench.streams`) runs in a fresh session; the error
of a cell (stream, batch size) is the mean over corruptions of the per-corruption error.
With ``clean`` the uncorrupted images are one more domain of the per-corruption streams
(iid, dirichlet, sorted), reported apart (``clean_error``): adapting must not hurt there.
``unseen_error`` is the mean over the corruptions the T3 generalist never saw in training.

Sizes: ``n`` images per corruption (a subset of the split fixed by the seed), a prefix of
it at batch size 1 (``n_small``) and per round of the continual stream (``n_continual``).
Continual and mixed streams run at the largest batch size only unless ``full_grid``.
Engines run with drift signals off: they are observability only (the ``via_grpc`` check,
whose server keeps them on, shows they do not change a prediction) and cost ~0.4 ms/image.
"""

from __future__ import annotations

import hashlib
import platform
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ttaserve.adapters import PolicyError, PreparedModel, canonical, policy_names, prepare
from ttaserve.bench.accuracy_grpc import predictor_factory
from ttaserve.bench.accuracy_rows import EnginePredictor, Predictor, Row, engine_for
from ttaserve.bench.corruptions import CORRUPTIONS, GENERALIST_SEEN, corrupt
from ttaserve.bench.streams import Episode, StreamSpec, build, generator, parse_stream
from ttaserve.cli_args import param
from ttaserve.data import load_split

__all__ = ["Config", "Row", "default_rows", "parse_row", "quick_config", "run"]

# Table order; policies registered later are appended in name order.
_ORDER = ("source", "generalist", "graded-bn", "graded-bn-nosafety", "alpha-bn", "tbn", "unmix-tns",
          "adanpc", "graded-bn+adanpc", "alpha-bn+adanpc", "tent", "tent-noguard", "ecotta", "t3", "t3-b")
_ROW = re.compile(r"^([a-z0-9_+-]+)(?:\((.*)\))?$")
# Compositions in the default table: AdaNPC over each kind of normalization.
_COMPOSED = ("graded-bn+adanpc", "alpha-bn+adanpc")
_SHARED_ONLY = ("continual", "mixed")  # streams of one long session


_EXTRAS = {
    "generalist": Row("generalist", "source", model="generalist"),
    "tent-noguard": Row("tent-noguard", "tent", guard=False),
    "graded-bn-nosafety": Row("graded-bn-nosafety", "graded-bn", safety=False),
}


def parse_row(text: str) -> Row:
    """``POLICY``, ``NORM+PRED``, ``POLICY(k=v,...)`` (values as for ``--param``), ``generalist``
    (source on the generalist twin), ``tent-noguard`` (tent with the collapse guard off) or
    ``graded-bn-nosafety`` (graded-bn with the safety net off)."""
    text = text.strip()
    if text in _EXTRAS:
        return _EXTRAS[text]
    match = _ROW.match(text)
    if not match or not _known(match.group(1)):
        raise ValueError(f"unknown policy row {text!r}; use one of {', '.join(policy_names())}, "
                         f"{', '.join(_EXTRAS)} or POLICY(key=value,...)")
    params = tuple(param(p) for p in (match.group(2) or "").split(",") if p.strip())
    return Row(text, match.group(1), params)


def _known(name: str) -> bool:
    try:
        canonical(name)
    except PolicyError:
        return False
    return True


def default_rows() -> tuple[Row, ...]:
    """Every registered policy with its defaults, the compositions and the extra rows the
    goals need."""
    names = [*policy_names(), *_COMPOSED, *_EXTRAS]
    ordered = [n for n in _ORDER if n in names] + sorted(set(names) - set(_ORDER))
    return tuple(parse_row(n) for n in ordered)


@dataclass(frozen=True)
class Config:
    seed: int = 0
    n: int = 600  # images per corruption (batch sizes > 1)
    n_small: int = 200  # images per corruption at batch size 1
    n_continual: int = 400  # images per corruption per round of the continual stream
    rounds: int = 3
    severity: int = 5
    split: str = "test"  # "train" for validation runs (parameter choices)
    corruptions: tuple[str, ...] = CORRUPTIONS
    streams: tuple[str, ...] = ("iid", "dirichlet(0.1)", "dirichlet(0.01)", "sorted", "continual", "mixed")
    clean: bool = True  # also run the per-corruption streams on the uncorrupted images
    batch_sizes: tuple[int, ...] = (64, 16, 1)
    full_grid: bool = False  # also run continual/mixed at the smaller batch sizes
    rows: tuple[Row, ...] = field(default_factory=default_rows)
    threads: int = 1
    data: str | None = None
    via_grpc: bool = False

    def cells(self) -> list[tuple[StreamSpec, int]]:
        largest = max(self.batch_sizes)
        return [(parse_stream(s), b) for b in sorted(self.batch_sizes, reverse=True)
                for s in self.streams
                if self.full_grid or b == largest or parse_stream(s).kind not in _SHARED_ONLY]

    @property
    def domains(self) -> tuple[str, ...]:
        """Names of the pools: the corruptions, then ``clean`` if asked for."""
        return (*self.corruptions, "clean") if self.clean else self.corruptions

    def images(self, spec: StreamSpec, batch: int) -> int:
        n = self.n_small if batch == 1 else self.n
        return min(n, self.n_continual) if spec.kind == "continual" else n


def quick_config(**overrides: Any) -> Config:
    """The smoke run: three corruptions, 200 images, batch 16, two streams (about a minute)."""
    base = Config(n=200, n_small=200, n_continual=100, rounds=2, batch_sizes=(16,),
                  corruptions=("gaussian_noise", "defocus_blur", "contrast"),
                  streams=("iid", "dirichlet(0.01)", "continual"))
    return replace(base, **overrides)


@dataclass(frozen=True)
class Pools:
    """Corrupted images and labels per corruption (the same subset of the split for all)."""

    x: torch.Tensor  # [corruptions, N, 1, 28, 28]
    y: torch.Tensor  # [corruptions, N]
    indices: torch.Tensor  # which images of the split


def make_pools(config: Config) -> Pools:
    x, y = load_split(config.split, config.data)
    size = max(config.n, config.n_small, config.n_continual)
    if size > len(y):
        raise ValueError(f"asked for {size} images per corruption; the {config.split} split has {len(y)}")
    chosen = torch.randperm(len(y), generator=generator(config.seed, "subset", config.split))[:size]
    images = x[chosen]
    xs = [corrupt(images, name, config.severity, seed=config.seed * 1000 + i)
          for i, name in enumerate(config.corruptions)]
    if config.clean:
        xs.append(images)
    return Pools(torch.stack(xs), y[chosen].expand(len(xs), -1), chosen)


def load_models(rows: tuple[Row, ...]) -> dict[str, PreparedModel]:
    from ttaserve import models

    wanted = {r.model for r in rows}
    return {name: prepare(getattr(models, name)()) for name in sorted(wanted)}


def run_episode(predictor: Predictor, episode: Episode, pools: Pools, batch: int,
                session: str, tick: Callable[[int], None]) -> tuple[torch.Tensor, int | None]:
    """Correctness of every sample of the episode (in stream order) and the session's resets."""
    x, y = pools.x[episode.domain, episode.index], pools.y[episode.domain, episode.index]
    correct = torch.zeros(len(episode), dtype=torch.bool)
    for lo in range(0, len(episode), batch):
        hi = min(lo + batch, len(episode))
        logits = predictor.predict(x[lo:hi], session, start=lo == 0, end=hi == len(episode))
        correct[lo:hi] = logits.argmax(1) == y[lo:hi]
        tick(hi - lo)
    return correct, predictor.finish(session)


def summarize(spec: StreamSpec, episodes: list[Episode], correct: list[torch.Tensor],
              resets: list[int | None], names: tuple[str, ...]) -> dict[str, Any]:
    """Error (%) over the corruptions, per corruption, on clean images, on the corruptions
    the generalist never saw, per round and per block (round, corruption)."""
    domain = torch.cat([e.domain for e in episodes])
    rounds = torch.cat([e.round for e in episodes])
    wrong = (~torch.cat(correct)).double()
    per = {name: _pct(wrong[domain == d]) for d, name in enumerate(names) if bool((domain == d).any())}
    corrupted = {k: v for k, v in per.items() if k != "clean"}
    unseen = [v for k, v in corrupted.items() if k not in GENERALIST_SEEN]
    out: dict[str, Any] = {"mean_error": float(np.mean(list(corrupted.values()))), "per_corruption": corrupted,
                           "clean_error": per.get("clean"),
                           "unseen_error": float(np.mean(unseen)) if unseen else None,
                           "resets": None if None in resets else sum(r or 0 for r in resets)}
    if spec.kind == "continual":
        present = [d for d in range(len(names)) if bool((domain == d).any())]
        blocks = [[_pct(wrong[(rounds == r) & (domain == d)]) for d in present]
                  for r in range(int(rounds.max()) + 1)]
        out["per_round"] = [float(np.mean(b)) for b in blocks]
        out["curve"] = [v for b in blocks for v in b]
    return out


def _pct(wrong: torch.Tensor) -> float:
    return round(100.0 * float(wrong.mean()), 4) if wrong.numel() else float("nan")


def run(config: Config, progress: Callable[[int, str], None] | None = None,
        predictors: Callable[[Row], Predictor] | None = None) -> dict[str, Any]:
    """Run the grid; returns every number and the configuration (the JSON document).

    ``progress(samples_done, label)`` is called after every batch; ``predictors`` builds a
    row's predictor (default: an in-process engine)."""
    torch.set_num_threads(config.threads)
    started = time.time()
    env = environment(config)  # hashed before loading: the weights these numbers come from
    pools = make_pools(config)
    models = load_models(config.rows)
    factory = predictors or _default_factory(config, models)
    cells = [_plan(config, spec, batch, pools) for spec, batch in config.cells()]
    results: list[dict[str, Any]] = [
        {"stream": spec.name, "batch": batch, "images_per_corruption": config.images(spec, batch),
         "samples_per_session": [len(e) for e in eps], "rows": {}} for spec, batch, eps in cells
    ]
    for row in config.rows:
        predictor = factory(row)
        try:
            for (spec, batch, episodes), result in zip(cells, results):
                result["rows"][row.label] = _run_cell(predictor, spec, batch, episodes, pools, config, row, progress)
                result["rows"][row.label]["path"] = predictor.path
        finally:
            predictor.close()
    return {"config": _config_json(config), "environment": env,
            "sizes": {"images_per_corruption": config.n, "batch1_images_per_corruption": config.n_small,
                      "continual_images_per_corruption_per_round": config.n_continual,
                      "subset_sha256": hashlib.sha256(pools.indices.numpy().tobytes()).hexdigest()[:16]},
            "cells": results, "seconds": round(time.time() - started, 1)}


def _default_factory(config: Config, models: dict[str, PreparedModel]) -> Callable[[Row], Predictor]:
    if config.via_grpc:
        return predictor_factory(models)
    return lambda row: EnginePredictor(engine_for(row, models))


def _plan(config: Config, spec: StreamSpec, batch: int,
          pools: Pools) -> tuple[StreamSpec, int, list[Episode]]:
    n = config.images(spec, batch)
    # Continual and mixed streams are made of the corruptions; clean is a per-domain stream.
    domains = len(config.domains) if spec.per_domain else len(config.corruptions)
    return spec, batch, build(spec, list(pools.y[:domains, :n]), config.seed, config.rounds)


def _run_cell(predictor: Predictor, spec: StreamSpec, batch: int, episodes: list[Episode],
              pools: Pools, config: Config, row: Row, progress: Callable[[int, str], None] | None) -> dict[str, Any]:
    label = f"{row.label} | {spec.name} | batch {batch}"
    tick = (lambda k: progress(k, label)) if progress else (lambda k: None)
    outcomes = [run_episode(predictor, e, pools, batch, f"{spec.name}/b{batch}/{i}", tick)
                for i, e in enumerate(episodes)]
    return summarize(spec, episodes, [c for c, _ in outcomes], [r for _, r in outcomes], config.domains)


def total_samples(config: Config) -> int:
    """Samples the whole run predicts (for a progress bar)."""
    per_row = 0
    for spec, batch in config.cells():
        n = config.images(spec, batch) * len(config.domains if spec.per_domain else config.corruptions)
        per_row += n * (config.rounds if spec.kind == "continual" else 1)
    return per_row * len(config.rows)


def _config_json(config: Config) -> dict[str, Any]:
    out = asdict(config)
    out["rows"] = [{"label": r.label, "policy": r.policy, "params": dict(r.params), "model": r.model,
                    "guard": r.guard} for r in config.rows]
    out["cells"] = [{"stream": s.name, "batch": b} for s, b in config.cells()]
    return out


def environment(config: Config) -> dict[str, Any]:
    """Versions, threads and hashes of the weights the numbers were measured with."""
    import ttaserve
    from ttaserve.models import weights_path

    hashes = {k: _sha256(weights_path(k)) for k in ("expert", "generalist", "adanpc_memory", "ecotta_meta")}
    return {"ttaserve": ttaserve.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(), "weights_sha256": hashes}


def _sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except OSError:
        return None


def iter_rows(result: dict[str, Any]) -> Iterator[str]:
    """Row labels of a result document in table order: by policy (variants next to their
    policy), then as first seen."""
    seen: dict[str, None] = {}
    for cell in result["cells"]:
        seen.update(dict.fromkeys(cell["rows"]))
    first = {label: i for i, label in enumerate(seen)}

    def rank(label: str) -> tuple[int, bool, int]:
        base = label.split("(")[0]
        return (_ORDER.index(base) if base in _ORDER else len(_ORDER), label != base, first[label])

    yield from sorted(seen, key=rank)
