"""Behaviour of the ``adanpc`` policy (docs/POLICIES.md, "adanpc")."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import make_tiny
from ttaserve.adapters import (
    ModelError,
    PolicyError,
    PreparedModel,
    TensorState,
    create_adapter,
    prepare,
)
from ttaserve.adapters.adanpc import (
    MEMORY_KEY,
    build_source_memory,
    confidence,
    confidence_cap,
    head_features,
    knn_scores,
    source_memory,
)
from ttaserve.engine import Engine

NEVER = 1.0  # above the confidence cap of any number of classes >= 2


CHANNELS = 8  # feature width of the tiny model; 4 post-ReLU features are too often tied


def _images(n: int, seed: int) -> torch.Tensor:
    """Random images with a per-image contrast and brightness, so features differ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 12, 12, generator=g)
    return x * 4 * torch.rand(n, 1, 1, 1, generator=g) + 2 * torch.rand(n, 1, 1, 1, generator=g) - 1


def _tiny_with_memory(seed: int = 0, n: int = 60, module: nn.Module | None = None) -> PreparedModel:
    """A tiny prepared model whose source memory holds n random images with random labels."""
    model = prepare(module if module is not None else make_tiny(seed, CHANNELS))
    labels = torch.randint(0, model.num_classes, (n,), generator=torch.Generator().manual_seed(seed))
    model.artifacts[MEMORY_KEY] = build_source_memory(model, _images(n, seed + 100), labels, batch_size=16)
    return model


def _stream(n_batches: int = 4, batch: int = 8, seed: int = 5) -> list[torch.Tensor]:
    return [_images(batch, seed + i) for i in range(n_batches)]


def _run(adapter, model, batches, state=None):  # type: ignore[no-untyped-def]
    state = adapter.init_state(model) if state is None else state
    return [adapter.forward(model, x, state) for x in batches], state


@pytest.fixture
def npc_model() -> PreparedModel:
    return _tiny_with_memory()


# -- parameters and checks -------------------------------------------------------------
@pytest.mark.parametrize(
    "bad", [{"k": 0}, {"temperature": 0.0}, {"temperature": -1.0}, {"beta": -0.1}, {"capacity": -1}]
)
def test_invalid_parameters_are_rejected(bad: dict) -> None:
    with pytest.raises(PolicyError):
        create_adapter("adanpc", **bad)


def test_model_without_memory_is_rejected(tiny: PreparedModel) -> None:
    with pytest.raises(ModelError, match="adanpc.memory"):
        create_adapter("adanpc", tiny)


def test_memory_with_out_of_range_labels_is_rejected(npc_model: PreparedModel) -> None:
    memory = dict(npc_model.artifact(MEMORY_KEY))
    memory["labels"] = memory["labels"] + npc_model.num_classes
    npc_model.artifacts[MEMORY_KEY] = memory
    with pytest.raises(ModelError, match="labels"):
        create_adapter("adanpc", npc_model)


def test_source_memory_is_normalized_head_input(npc_model: PreparedModel) -> None:
    x = _images(5, 3)
    memory = build_source_memory(npc_model, x, torch.arange(5) % 3)
    features, _ = npc_model.features_and_logits(x)
    torch.testing.assert_close(memory["features"], F.normalize(features, dim=1))
    assert memory["labels"].dtype == torch.int64


# -- the vote --------------------------------------------------------------------------
def test_confidence_never_exceeds_the_cap(npc_model: PreparedModel) -> None:
    scores = create_adapter("adanpc", npc_model).forward(
        npc_model, _images(32, 1), create_adapter("adanpc", npc_model).init_state(npc_model)
    )
    assert float(confidence(scores).max()) <= confidence_cap(3) + 1e-6
    assert confidence_cap(10) == pytest.approx(math.e / (math.e + 9), abs=1e-4)
    assert torch.all(scores >= 1e-5) and torch.all(scores <= 1.0)


def test_unanimous_neighbours_reach_the_cap() -> None:
    keys = F.normalize(torch.randn(20, 6, generator=torch.Generator().manual_seed(0)), dim=1)
    scores = knn_scores(torch.randn(4, 6), [(keys, torch.full((20,), 2))], 5, 0.1, 10)
    torch.testing.assert_close(confidence(scores), torch.full((4,), confidence_cap(10)))


def test_k1_predicts_the_label_of_the_nearest_entry(npc_model: PreparedModel) -> None:
    adapter = create_adapter("adanpc", npc_model, k=1, beta=0.0)
    state = adapter.init_state(npc_model)
    _run(adapter, npc_model, _stream(2), state)  # some test entries too
    keys = torch.cat([source_memory(npc_model)[0], state["features"]])
    labels = torch.cat([source_memory(npc_model)[1], state["labels"]])
    x = _images(16, 77)
    scores = adapter.forward(npc_model, x, state, adapt=False)
    sims = F.normalize(head_features(npc_model, x), dim=1) @ keys.T
    # Post-ReLU features can repeat after normalization, so the nearest entry may be
    # tied: the prediction must then be the label of one of the tied entries.
    nearest = sims >= sims.max(dim=1, keepdim=True).values - 1e-6
    predicted = scores.argmax(dim=1)
    for b in range(16):
        assert predicted[b] in labels[nearest[b]]
    unique = nearest.sum(dim=1) == 1
    assert unique.sum() >= 8
    assert torch.equal(predicted[unique], labels[sims.argmax(dim=1)][unique])
    # A single neighbour has all the weight: its class scores 1, the others the floor.
    assert torch.allclose(scores.max(dim=1).values, torch.ones(16))


@pytest.mark.parametrize("c", [1e-3, 0.5, 7.0, 1e4])
def test_scaling_features_changes_nothing_in_the_vote(c: float) -> None:
    g = torch.Generator().manual_seed(1)
    keys = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    labels = torch.randint(0, 4, (50,), generator=g)
    features = torch.randn(6, 8, generator=g)
    base = knn_scores(features, [(keys, labels)], 10, 0.1, 4)
    torch.testing.assert_close(knn_scores(c * features, [(keys, labels)], 10, 0.1, 4), base)


class _Scale(nn.Module):
    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c * x


def test_a_model_with_scaled_features_gives_the_same_predictions_and_memory() -> None:
    plain = _tiny_with_memory(seed=3)
    scaled_net = make_tiny(3, CHANNELS)
    scaled_net.pool.append(_Scale(25.0))  # the head now sees 25 × the features
    scaled = _tiny_with_memory(seed=3, module=scaled_net)
    x = _images(16, 9)
    assert not torch.allclose(plain(x), scaled(x))  # the model's own logits do change
    outs = []
    for model in (plain, scaled):
        adapter = create_adapter("adanpc", model, beta=0.0)
        scores, state = _run(adapter, model, [x, x.flip(0)])
        outs.append((scores, state))
    for a, b in zip(outs[0][0], outs[1][0]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(outs[0][1]["features"], outs[1][1]["features"])


# -- memory growth ---------------------------------------------------------------------
def test_beta_above_cap_is_a_static_source_knn_independent_of_order(npc_model: PreparedModel) -> None:
    adapter = create_adapter("adanpc", npc_model, beta=NEVER)
    batches = _stream(4)
    forward_scores, state = _run(adapter, npc_model, batches)
    assert state["features"].shape[0] == 0
    backward_scores, _ = _run(adapter, npc_model, batches[::-1])
    static = [
        knn_scores(head_features(npc_model, x), [source_memory(npc_model)], 100, 0.1, 3) for x in batches
    ]
    for got, rev, want in zip(forward_scores, backward_scores[::-1], static):
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(rev, want)


def test_beta_zero_adds_every_sample_with_its_argmax_label(npc_model: PreparedModel) -> None:
    adapter = create_adapter("adanpc", npc_model, beta=0.0, capacity=1000)
    state = adapter.init_state(npc_model)
    for i, x in enumerate(_stream(3, batch=5)):
        scores = adapter.forward(npc_model, x, state)
        assert state["features"].shape == (5 * (i + 1), CHANNELS)
        assert torch.equal(state["labels"][-5:], scores.argmax(dim=1))
        torch.testing.assert_close(state["features"][-5:], F.normalize(head_features(npc_model, x), dim=1))


def test_test_entries_change_later_predictions(npc_model: PreparedModel) -> None:
    adapter = create_adapter("adanpc", npc_model, beta=0.0, k=5)
    x = _images(8, 11)
    state = adapter.init_state(npc_model)
    first = adapter.forward(npc_model, x, state)
    assert not torch.allclose(adapter.forward(npc_model, x, state), first)


def test_capacity_keeps_the_newest_entries_fifo(npc_model: PreparedModel) -> None:
    adapter = create_adapter("adanpc", npc_model, beta=0.0, capacity=5)
    state = adapter.init_state(npc_model)
    seen_features, seen_labels, sizes = [], [], []
    for x in _stream(4, batch=3):
        scores = adapter.forward(npc_model, x, state)
        seen_features.append(F.normalize(head_features(npc_model, x), dim=1))
        seen_labels.append(scores.argmax(dim=1))
        sizes.append(state["features"].shape[0])
    assert sizes == [3, 5, 5, 5]
    torch.testing.assert_close(state["features"], torch.cat(seen_features)[-5:])
    assert torch.equal(state["labels"], torch.cat(seen_labels)[-5:])


def test_batch_larger_than_capacity_keeps_its_last_samples(npc_model: PreparedModel) -> None:
    adapter = create_adapter("adanpc", npc_model, beta=0.0, capacity=4)
    state = adapter.init_state(npc_model)
    x = _images(10, 2)
    adapter.forward(npc_model, x, state)
    torch.testing.assert_close(state["features"], F.normalize(head_features(npc_model, x[-4:]), dim=1))


def test_capacity_zero_never_stores(npc_model: PreparedModel) -> None:
    adapter = create_adapter("adanpc", npc_model, beta=0.0, capacity=0)
    _, state = _run(adapter, npc_model, _stream(2))
    assert state["features"].shape[0] == 0 and adapter.signals(state)["memory_test_entries"] == 0


def test_source_memory_is_shared_and_never_modified(npc_model: PreparedModel) -> None:
    artifact = npc_model.artifact(MEMORY_KEY)
    before = {k: v.clone() for k, v in artifact.items()}
    engine = Engine(npc_model, "adanpc", beta=0.0, capacity=8)
    for x in _stream(3):
        engine.predict(x, session="a")
        engine.predict(x.flip(0), session="b")
    assert npc_model.artifact(MEMORY_KEY) is artifact
    for key, value in before.items():
        assert torch.equal(artifact[key], value)
    states = [engine.sessions.get(s).state for s in ("a", "b")]  # type: ignore[union-attr]
    assert all(s["features"].shape[0] == 8 for s in states)  # only test entries per session
    assert source_memory(npc_model)[0] is source_memory(npc_model)[0]  # one copy for all sessions


# -- general policy contract -----------------------------------------------------------
def test_predicts_before_adapting(npc_model: PreparedModel) -> None:
    adapter = create_adapter("adanpc", npc_model, beta=0.0)
    _, state = _run(adapter, npc_model, _stream(2))
    x = _images(8, 40)
    frozen = adapter.forward(npc_model, x, TensorState(state.state_dict()), adapt=False)
    torch.testing.assert_close(adapter.forward(npc_model, x, state), frozen, rtol=0, atol=0)


def test_same_input_and_seed_give_the_same_output() -> None:
    outs = []
    for _ in range(2):
        model = _tiny_with_memory(seed=4)
        adapter = create_adapter("adanpc", model, beta=0.0)
        outs.append(_run(adapter, model, _stream(3))[0])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_reset_returns_to_the_source_memory(npc_model: PreparedModel) -> None:
    adapter = create_adapter("adanpc", npc_model, beta=0.0)
    batches = _stream(3)
    first, state = _run(adapter, npc_model, batches)
    assert state["features"].shape[0] > 0
    fresh = adapter.init_state(npc_model)
    assert fresh["features"].shape[0] == 0 and fresh["labels"].shape == (0,)
    again, _ = _run(adapter, npc_model, batches, fresh)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_state_round_trip_gives_a_bit_identical_next_prediction(npc_model: PreparedModel) -> None:
    adapter = create_adapter("adanpc", npc_model, beta=0.0, capacity=10)
    _, state = _run(adapter, npc_model, _stream(3))
    restored = adapter.init_state(npc_model)
    restored.load_state_dict(state.state_dict())
    x = _images(8, 50)
    assert torch.equal(adapter.forward(npc_model, x, restored), adapter.forward(npc_model, x, state))
    assert torch.equal(restored["features"], state["features"])


def test_adapt_false_leaves_the_state_unchanged(npc_model: PreparedModel) -> None:
    adapter = create_adapter("adanpc", npc_model, beta=0.0)
    _, state = _run(adapter, npc_model, _stream(2))
    before = state.state_dict()
    adapter.forward(npc_model, _images(8, 60), state, adapt=False)
    assert before.keys() == state.keys()
    assert all(torch.equal(before[k], state[k]) for k in before)


def test_interleaved_sessions_with_different_policies_equal_each_alone(npc_model: PreparedModel) -> None:
    batches = _stream(3)
    alone = {}
    for policy in ("adanpc", "alpha-bn"):
        engine = Engine(npc_model, policy)
        alone[policy] = [engine.predict(x, session=1) for x in batches]
    engine = Engine(npc_model, "adanpc")
    mixed = {"adanpc": [], "alpha-bn": []}  # type: dict[str, list[torch.Tensor]]
    for x in batches:
        mixed["adanpc"].append(engine.predict(x, session="npc"))
        mixed["alpha-bn"].append(engine.predict(x, session="bn", policy="alpha-bn"))
    for policy in alone:
        for a, b in zip(alone[policy], mixed[policy]):
            assert torch.equal(a, b)


def test_drift_reports_memory_size(npc_model: PreparedModel) -> None:
    adapter = create_adapter("adanpc", npc_model, beta=0.0, capacity=16)
    _, state = _run(adapter, npc_model, _stream(1))
    assert adapter.signals(state) == {"memory_test_entries": 8.0, "memory_fill": 0.5}


# -- the demo model and its shipped memory ---------------------------------------------
def test_demo_memory_is_sensible_on_real_data(demo_module: nn.Module) -> None:
    from ttaserve.data import load_split

    x, y = load_split("test")
    x, y = x[:512], y[:512]
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    engine = Engine(demo_module, "adanpc")
    memory = engine.model.artifact(MEMORY_KEY)
    assert memory["features"].shape[1] == 64 and memory["labels"].unique().numel() == 10
    clean = torch.cat([engine.predict(x[i : i + 64], adapt=False) for i in range(0, 512, 64)])
    assert (clean.argmax(1) != y).float().mean() < 0.12
    source = Engine(demo_module, "source").predict(noisy)
    adanpc = torch.cat([engine.predict(noisy[i : i + 64], session=0) for i in range(0, 512, 64)])
    assert (adanpc.argmax(1) != y).float().mean() <= (source.argmax(1) != y).float().mean() + 0.02
