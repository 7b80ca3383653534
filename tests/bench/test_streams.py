"""Stream builders of the accuracy benchmark: seeded, complete, label-correlated when asked."""

from __future__ import annotations

import pytest
import torch

from ttaserve.bench.streams import (
    Episode,
    StreamSpec,
    build,
    dirichlet_order,
    generator,
    iid_order,
    parse_stream,
    run_lengths,
)
from ttaserve.bench.streams import _dirichlet as dirichlet_draw


def balanced_labels(n: int = 1000, classes: int = 10, seed: int = 3) -> torch.Tensor:
    labels = torch.arange(n) % classes
    return labels[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def pairs(episode: Episode) -> list[tuple[int, int]]:
    return list(zip(episode.domain.tolist(), episode.index.tolist()))


@pytest.mark.parametrize("text, spec", [
    ("iid", StreamSpec("iid")),
    ("dirichlet(0.01)", StreamSpec("dirichlet", 0.01)),
    ("dirichlet:0.1", StreamSpec("dirichlet", 0.1)),
    (" Continual ", StreamSpec("continual")),
    ("mixed", StreamSpec("mixed")),
    ("sorted", StreamSpec("sorted")),
])
def test_parse_stream(text: str, spec: StreamSpec) -> None:
    assert parse_stream(text) == spec
    assert parse_stream(spec.name) == spec  # the display name parses back


@pytest.mark.parametrize("text", ["dirichlet", "dirichlet(0)", "dirichlet(-1)", "shuffled", ""])
def test_parse_stream_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_stream(text)


@pytest.mark.parametrize("stream", ["iid", "dirichlet(0.1)", "dirichlet(0.01)", "sorted", "continual", "mixed"])
def test_same_seed_same_stream_other_seed_other_stream(stream: str) -> None:
    labels = [balanced_labels(200, seed=d) for d in range(3)]
    spec = parse_stream(stream)
    first, again, other = (build(spec, labels, seed, rounds=2) for seed in (7, 7, 8))
    assert all(pairs(a) == pairs(b) for a, b in zip(first, again))
    assert any(pairs(a) != pairs(b) for a, b in zip(first, other))


@pytest.mark.parametrize("stream", ["iid", "dirichlet(0.1)", "dirichlet(0.01)", "sorted"])
def test_per_domain_streams_show_every_sample_exactly_once(stream: str) -> None:
    labels = [balanced_labels(300, seed=d) for d in range(4)]
    episodes = build(parse_stream(stream), labels, seed=0)
    assert len(episodes) == 4
    for d, episode in enumerate(episodes):
        assert set(episode.domain.tolist()) == {d}
        assert sorted(episode.index.tolist()) == list(range(300))
        assert episode.round.eq(0).all()


def test_mixed_is_one_episode_with_every_sample_of_every_domain_once() -> None:
    labels = [balanced_labels(100, seed=d) for d in range(3)]
    (episode,) = build(parse_stream("mixed"), labels, seed=0)
    assert sorted(pairs(episode)) == [(d, i) for d in range(3) for i in range(100)]
    # shuffled together: the domains are interleaved, not in blocks
    assert run_lengths(episode.domain).float().mean() < 3


def test_continual_runs_domains_in_order_every_round_with_every_sample_once() -> None:
    labels = [balanced_labels(50, seed=d) for d in range(3)]
    (episode,) = build(parse_stream("continual"), labels, seed=0, rounds=3)
    assert len(episode) == 3 * 3 * 50
    expected_domains = torch.arange(3).repeat_interleave(50).repeat(3)
    assert torch.equal(episode.domain, expected_domains)
    assert torch.equal(episode.round, torch.arange(3).repeat_interleave(150))
    rounds = [episode.index[episode.round == r] for r in range(3)]
    for block in rounds:
        for d in range(3):
            assert sorted(block[d * 50:(d + 1) * 50].tolist()) == list(range(50))
    assert not torch.equal(rounds[0], rounds[1])  # reshuffled every round


def test_small_delta_gives_long_same_label_runs() -> None:
    labels = balanced_labels(1000)
    mean_run = {}
    for name, order in {
        "iid": iid_order(1000, generator(0, "t")),
        "0.1": dirichlet_order(labels, 0.1, generator(0, "t")),
        "0.01": dirichlet_order(labels, 0.01, generator(0, "t")),
    }.items():
        mean_run[name] = run_lengths(labels[order]).float().mean().item()
    assert mean_run["iid"] < 1.5
    assert mean_run["0.01"] > 30  # ~100 images per class in one or two runs
    assert mean_run["0.01"] > mean_run["0.1"] > 5 * mean_run["iid"]


def test_dirichlet_keeps_a_class_contiguous_inside_each_chunk() -> None:
    """With one chunk every class is a single run (a label-sorted stream in random class order)."""
    labels = balanced_labels(200, classes=5)
    order = dirichlet_order(labels, 0.5, generator(1), chunks=1)
    assert len(run_lengths(labels[order])) == 5
    assert sorted(order.tolist()) == list(range(200))


def test_dirichlet_handles_uneven_and_missing_classes() -> None:
    labels = torch.tensor([0] * 37 + [3] * 5 + [7] * 1)
    order = dirichlet_order(labels, 0.01, generator(2))
    assert sorted(order.tolist()) == list(range(43))


@pytest.mark.parametrize("delta", [0.001, 0.01, 0.1, 1.0, 10.0])
def test_dirichlet_draw_is_a_probability_vector(delta: float) -> None:
    shares = dirichlet_draw(torch.full((10,), delta, dtype=torch.float64), generator(5, delta))
    assert torch.isfinite(shares).all() and (shares >= 0).all()
    assert shares.sum().item() == pytest.approx(1.0)


def test_dirichlet_draw_concentrates_for_small_delta_and_spreads_for_large() -> None:
    def top_share(delta: float) -> float:
        draws = [dirichlet_draw(torch.full((10,), delta, dtype=torch.float64), generator(s, delta)).max()
                 for s in range(50)]
        return float(torch.stack(draws).mean())

    assert top_share(0.01) > 0.85  # E[max] = 0.94 for Dirichlet(0.01 x 10)
    assert top_share(100.0) < 0.2


def test_streams_of_one_domain_do_not_depend_on_the_others() -> None:
    """Seeds are derived per (stream, domain): adding a corruption moves nothing else."""
    labels = [balanced_labels(100, seed=d) for d in range(3)]
    spec = parse_stream("dirichlet(0.1)")
    fewer, more = build(spec, labels[:2], seed=0), build(spec, labels, seed=0)
    assert all(pairs(a) == pairs(b) for a, b in zip(fewer, more))


def test_sorted_stream_is_one_run_per_class_in_a_random_class_order() -> None:
    labels = balanced_labels(300, seed=0)
    orders = [build(parse_stream("sorted"), [labels], seed)[0].index for seed in (0, 1)]
    for order in orders:
        assert run_lengths(labels[order]).numel() == int(torch.unique(labels).numel())
    assert labels[orders[0]][0] != labels[orders[1]][0] or not torch.equal(orders[0], orders[1])
