"""Test streams that judge adaptation policies (docs/BENCHMARKS.md, "Accuracy").

A stream is a list of *episodes*; each episode is run through one fresh session (no state
carried between episodes). An episode is a sequence of ``(domain, index)`` pairs: the
corruption a sample comes from and its position in that corruption's image pool.

- ``iid``: one episode per corruption, its images uniformly shuffled.
- ``dirichlet(δ)``: one episode per corruption, label-correlated. Built as the non-i.i.d.
  TTA literature builds it (the temporally correlated sampler of RoTTA, Yuan et al. CVPR
  2023, also used by UnMix-TNS), written here from that description:
  1. the images of each class c are shuffled;
  2. the stream is cut into ``chunks`` slots (default: as many as there are classes);
     each class draws proportions q_c ~ Dirichlet(δ·1) over the slots and its shuffled
     images are split into consecutive runs of sizes ⌊cumsum(q_c)·n_c⌋ (slot s gets run s);
  3. inside a slot, the runs of the classes it received are put one after another in a
     random class order (so a class is contiguous inside a slot);
  4. the stream is slot 0, slot 1, ...
  Small δ puts nearly all of a class into one slot: long runs of one label. Large δ spreads
  every class over every slot, approaching a stream cycling through classes.
- ``sorted``: one episode per corruption, sorted by label: the classes in a random order,
  each class's images shuffled and contiguous (the most label-correlated stream: a camera
  that sees one kind of object after another).
- ``continual``: one episode: the corruptions in their standard order, each shuffled,
  repeated for ``rounds`` rounds (reshuffled every round), no reset in between.
- ``mixed``: one episode: the images of all corruptions shuffled together.

Every random draw comes from a ``torch.Generator`` seeded from ``(seed, stream, domain,
round)``, so the same seed gives the same streams, and changing one stream or corruption
does not move the others. Every sample of every domain appears exactly once per episode
(per round for ``continual``).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import torch

__all__ = ["Episode", "StreamSpec", "build", "dirichlet_order", "iid_order", "parse_stream", "sorted_order"]

_DIRICHLET = re.compile(r"^dirichlet[(:]([0-9.eE+-]+)\)?$")


@dataclass(frozen=True)
class StreamSpec:
    """A stream kind and its parameter: ``iid``, ``dirichlet`` (δ), ``sorted``, ``continual``,
    ``mixed``."""

    kind: str
    delta: float = 0.0  # dirichlet only

    @property
    def name(self) -> str:
        return f"dirichlet({self.delta:g})" if self.kind == "dirichlet" else self.kind

    @property
    def per_domain(self) -> bool:
        """True when every corruption is its own episode (fresh session each)."""
        return self.kind in ("iid", "dirichlet", "sorted")


def parse_stream(text: str) -> StreamSpec:
    """``iid``, ``sorted``, ``continual``, ``mixed``, ``dirichlet(0.01)`` or ``dirichlet:0.01``."""
    text = text.strip().lower()
    if text in ("iid", "sorted", "continual", "mixed"):
        return StreamSpec(text)
    match = _DIRICHLET.match(text)
    if match:
        delta = float(match.group(1))
        if delta > 0:
            return StreamSpec("dirichlet", delta)
    raise ValueError(f"unknown stream {text!r}; use iid, dirichlet(DELTA) with DELTA > 0, "
                     "sorted, continual or mixed")


@dataclass(frozen=True)
class Episode:
    """One session's sequence of samples: ``domain[t]``, ``index[t]`` and ``round[t]``."""

    domain: torch.Tensor  # int64 [T]: which corruption
    index: torch.Tensor  # int64 [T]: which image of that corruption's pool
    round: torch.Tensor  # int64 [T]: 0 except for continual streams

    def __len__(self) -> int:
        return int(self.domain.numel())


def generator(seed: int, *parts: object) -> torch.Generator:
    """A generator seeded from ``seed`` and a label (stable across runs and platforms)."""
    label = "/".join(str(p) for p in parts).encode()
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(label)) % 2**63)


def iid_order(n: int, gen: torch.Generator) -> torch.Tensor:
    """A uniform permutation of ``range(n)``."""
    return torch.randperm(n, generator=gen)


def dirichlet_order(labels: torch.Tensor, delta: float, gen: torch.Generator,
                    chunks: int | None = None) -> torch.Tensor:
    """A label-correlated permutation of ``range(len(labels))`` (see the module docstring)."""
    classes = [int(c) for c in torch.unique(labels)]
    chunks = chunks or len(classes)
    concentration = torch.full((chunks,), float(delta), dtype=torch.float64)
    slots: list[list[torch.Tensor]] = [[] for _ in range(chunks)]
    for c in classes:
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(members.numel(), generator=gen)]
        shares = _dirichlet(concentration, gen)
        cuts = (torch.cumsum(shares, 0)[:-1] * members.numel()).floor().long().clamp(0, members.numel())
        bounds = [0, *cuts.tolist(), members.numel()]
        for s in range(chunks):
            slots[s].append(members[bounds[s]:bounds[s + 1]])
    order: list[torch.Tensor] = []
    for runs in slots:
        for r in torch.randperm(len(runs), generator=gen).tolist():
            order.append(runs[r])
    return torch.cat(order)


def sorted_order(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A permutation of ``range(len(labels))`` that groups the labels: classes in a random
    order, each class's members shuffled."""
    classes = torch.unique(labels)
    rank = torch.empty(int(classes.max()) + 1, dtype=torch.long)
    rank[classes[torch.randperm(classes.numel(), generator=gen)]] = torch.arange(classes.numel())
    shuffled = torch.randperm(labels.numel(), generator=gen)
    return shuffled[torch.argsort(rank[labels[shuffled]], stable=True)]


def _dirichlet(concentration: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One Dirichlet draw from ``gen`` (torch's distribution ignores generators).

    Gamma(a) for a < 1 by Marsaglia-Tsang on a + 1 times U^(1/a); the shares are normalized
    in log space, because with δ = 0.01 the Gamma draws underflow float64."""
    boosted = concentration + 1.0
    d = boosted - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    log_gamma = torch.empty_like(concentration)
    for i in range(concentration.numel()):
        while True:  # rejection sampler for Gamma(a + 1); accepts ~97 % of draws
            z = torch.randn((), generator=gen, dtype=torch.float64)
            v = (1.0 + c[i] * z) ** 3
            u = torch.rand((), generator=gen, dtype=torch.float64)
            if v > 0 and torch.log(u) < 0.5 * z * z + d[i] - d[i] * v + d[i] * torch.log(v):
                break
        u = torch.rand((), generator=gen, dtype=torch.float64).clamp_min(1e-300)
        log_gamma[i] = torch.log(d[i] * v) + torch.log(u) / concentration[i]
    return torch.softmax(log_gamma, 0)


def build(spec: StreamSpec, labels: list[torch.Tensor], seed: int, rounds: int = 1) -> list[Episode]:
    """The episodes of ``spec`` over domains whose pools have labels ``labels[d]``."""
    if spec.per_domain:
        return [_single(d, _order(spec, y, seed, d)) for d, y in enumerate(labels)]
    if spec.kind == "continual":
        blocks = [(r, d, iid_order(len(y), generator(seed, "continual", d, r)))
                  for r in range(rounds) for d, y in enumerate(labels)]
        return [Episode(
            torch.cat([torch.full_like(o, d) for _, d, o in blocks]),
            torch.cat([o for _, _, o in blocks]),
            torch.cat([torch.full_like(o, r) for r, _, o in blocks]),
        )]
    domain = torch.cat([torch.full((len(y),), d, dtype=torch.long) for d, y in enumerate(labels)])
    index = torch.cat([torch.arange(len(y)) for y in labels])
    order = iid_order(len(domain), generator(seed, "mixed"))
    return [Episode(domain[order], index[order], torch.zeros_like(order))]


def _order(spec: StreamSpec, labels: torch.Tensor, seed: int, domain: int) -> torch.Tensor:
    gen = generator(seed, spec.name, domain)
    if spec.kind == "iid":
        return iid_order(len(labels), gen)
    if spec.kind == "sorted":
        return sorted_order(labels, gen)
    return dirichlet_order(labels, spec.delta, gen)


def _single(domain: int, order: torch.Tensor) -> Episode:
    return Episode(torch.full_like(order, domain), order, torch.zeros_like(order))


def run_lengths(labels: torch.Tensor) -> torch.Tensor:
    """Lengths of the runs of equal consecutive labels (a measure of label correlation)."""
    if labels.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.unique_consecutive(labels, return_counts=True)[1]
