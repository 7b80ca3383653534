"""graded-bn: the properties its module docstring promises."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import make_tiny
from ttaserve import Engine
from ttaserve.adapters import PolicyError, PreparedModel, TensorState, create_adapter
from ttaserve.adapters.graded_bn import batch_trust, label_diversity, layer_priors, mixed, push
from ttaserve.bench.corruptions import corrupt
from ttaserve.data import load_split


def _stream(seed: int = 2, batches: int = 6, size: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(size, 1, 12, 12, generator=g) * 0.5 + 0.4 for _ in range(batches)]


def _run(model: PreparedModel, xs: list[torch.Tensor], **params: float) -> tuple[list[torch.Tensor], TensorState]:
    adapter = create_adapter("graded-bn", model, **params)
    state = adapter.init_state(model)
    return [adapter.forward(model, x, state) for x in xs], state


def test_huge_priors_are_source_exactly(tiny: PreparedModel, images: torch.Tensor) -> None:
    outs, _ = _run(tiny, [images, images], prior_first=1e9, prior_last=1e9, momentum=0.0)
    expected = make_tiny()(images)
    torch.testing.assert_close(outs[0], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[1], expected, rtol=0, atol=1e-6)


def test_zero_priors_after_diverse_predictions_are_test_batch_normalization(tiny: PreparedModel,
                                                                          images: torch.Tensor) -> None:
    """r = 1 (the last predictions spread over the classes) and no prior: the batch's own moments."""
    adapter = create_adapter("graded-bn", tiny, prior_first=0.0, prior_last=0.0)
    state = adapter.init_state(tiny)
    state["window"], state["seen"] = torch.arange(64) % 3, torch.tensor(64)
    tbn = create_adapter("tbn", tiny).forward(tiny, images, TensorState())
    torch.testing.assert_close(adapter.forward(tiny, images, state), tbn, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("labels", "entropy", "expected"), [
    ([0] * 8, 0.05, 0.0),  # one class, confident: the batch does not count
    ([0] * 8, 0.45, 1.0),  # one class, but the model is unsure (a strong shift): it counts
    ([0] * 8, 0.325, 0.5 / 0.85 - 0.15 / 0.85),  # halfway between sure and unsure
    (list(range(8)), 0.05, 1.0),  # as diverse as possible
    ([0] * 8, -1.0, 0.0),  # no entropy measured yet: diversity alone
])
def test_batch_trust(tiny: PreparedModel, labels: list[int], entropy: float, expected: float) -> None:
    adapter = create_adapter("graded-bn", tiny)
    state = adapter.init_state(tiny)
    state["window"][:8] = torch.tensor(labels)
    state["entropy"] = torch.tensor(entropy)
    assert batch_trust(adapter.params, state, 10) == pytest.approx(expected)


def test_momentum_zero_never_moves_the_running_estimate(tiny: PreparedModel) -> None:
    _, state = _run(tiny, _stream(), momentum=0.0)
    for layer in tiny.bn_layers:
        assert torch.equal(state[f"mean.{layer.index}"], layer.running_mean)
        assert torch.equal(state[f"var.{layer.index}"], layer.running_var)


def test_estimate_moves_toward_the_data_and_stays_positive(tiny: PreparedModel) -> None:
    # The tiny model predicts one class for these images; a window primed with a spread
    # of labels (long enough to stay spread) lets the estimate learn.
    adapter = create_adapter("graded-bn", tiny, momentum=0.05, window=1024)
    state = adapter.init_state(tiny)
    state["window"] = torch.arange(1024) % 3
    state["entropy"] = torch.tensor(0.05)
    for x in _stream(batches=20):
        adapter.forward(tiny, x, state)
    first = tiny.bn_layers[0]
    assert not torch.equal(state[f"mean.{first.index}"], first.running_mean)
    assert all(bool((state[f"var.{layer.index}"] > 0).all()) for layer in tiny.bn_layers)


def test_prediction_precedes_the_update(tiny: PreparedModel) -> None:
    """A batch's output depends only on the state before it and on itself."""
    xs = _stream()
    outs, _ = _run(tiny, xs)
    adapter = create_adapter("graded-bn", tiny)
    state = adapter.init_state(tiny)
    for x in xs[:3]:
        adapter.forward(tiny, x, state)
    before = state.state_dict()
    replay = TensorState(before)
    assert torch.equal(adapter.forward(tiny, xs[3], replay), outs[3])


def test_adapt_false_changes_nothing(tiny: PreparedModel, images: torch.Tensor) -> None:
    adapter = create_adapter("graded-bn", tiny)
    state = adapter.init_state(tiny)
    before = state.state_dict()
    adapter.forward(tiny, images, state, adapt=False)
    assert all(torch.equal(state[k], v) for k, v in before.items())


def test_priors_grow_geometrically_with_depth() -> None:
    params = create_adapter("graded-bn", prior_first=16, prior_last=4096).params
    priors = layer_priors(params, 9)
    assert priors[0] == pytest.approx(16) and priors[-1] == pytest.approx(4096)
    assert priors[4] == pytest.approx(256)  # the geometric middle
    assert layer_priors(params, 1) == [16]


@pytest.mark.parametrize(("labels", "expected"), [
    ([], 1.0),  # nothing to judge yet
    ([3], 1.0),
    ([3, 3, 3, 3], 0.0),  # one class
    ([0, 1, 2, 3], 1.0),  # as spread as possible
    ([0, 0, 1, 1], 1 / 3),  # two classes where four were possible
])
def test_label_diversity(labels: list[int], expected: float) -> None:
    window = torch.full((8,), -1, dtype=torch.long)
    window[: len(labels)] = torch.tensor(labels, dtype=torch.long)
    assert label_diversity(window, 10) == pytest.approx(expected)


def test_label_diversity_between_the_extremes() -> None:
    window = torch.tensor([0] * 6 + [1, 2], dtype=torch.long)
    effective = math.exp(-(0.75 * math.log(0.75) + 2 * 0.125 * math.log(0.125)))
    assert label_diversity(window, 10) == pytest.approx((effective - 1) / 7)  # 8 labels: 8 possible


def test_label_sorted_batches_weigh_less_than_diverse_ones(tiny: PreparedModel) -> None:
    """After a one-class stretch the running estimate has moved less than after a diverse one."""
    adapter = create_adapter("graded-bn", tiny, momentum=0.05)
    one_class, diverse = adapter.init_state(tiny), adapter.init_state(tiny)
    one_class["window"] = torch.zeros_like(one_class["window"])
    diverse["window"] = torch.arange(diverse["window"].numel()) % 3
    one_class["entropy"] = diverse["entropy"] = torch.tensor(0.05)  # a confident model
    x = _stream(batches=1)[0]
    adapter.forward(tiny, x, one_class)
    adapter.forward(tiny, x, diverse)
    layer = tiny.bn_layers[0]
    moved = {name: float((s[f"mean.{layer.index}"] - layer.running_mean).abs().sum())
             for name, s in (("one", one_class), ("diverse", diverse))}
    assert moved["one"] < moved["diverse"]


def test_mixture_moments_follow_the_law_of_total_variance() -> None:
    a_mean, a_var, b_mean, b_var = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([3.0]), torch.tensor([0.5])
    mean, var = mixed(0.25, a_mean, a_var, b_mean, b_var)
    samples_mean = 0.25 * 1 + 0.75 * 3
    second = 0.25 * (2 + 1) + 0.75 * (0.5 + 9)
    assert float(mean) == pytest.approx(samples_mean)
    assert float(var) == pytest.approx(second - samples_mean ** 2)
    assert mixed(0.0, a_mean, a_var, b_mean, b_var)[0] is b_mean


def test_window_keeps_stream_order() -> None:
    window = torch.full((4,), -1, dtype=torch.long)
    window = push(window, 0, torch.tensor([1, 2, 3]))
    window = push(window, 3, torch.tensor([4, 5]))
    assert window.tolist() == [5, 2, 3, 4]
    assert push(window, 5, torch.tensor([6, 7, 8, 9, 10])).tolist() == [9, 10, 7, 8]


def test_batch_size_one_works_and_differs_from_instance_normalization(tiny: PreparedModel) -> None:
    x = _stream(size=1, batches=1)[0]
    out, _ = _run(tiny, [x])
    tbn = create_adapter("tbn", tiny).forward(tiny, x, TensorState())
    assert torch.isfinite(out[0]).all()
    assert not torch.allclose(out[0], tbn)


@pytest.mark.parametrize("bad", [{"momentum": 1.5}, {"prior_first": -1.0}, {"window": 0}])
def test_invalid_parameters_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(PolicyError):
        create_adapter("graded-bn", **bad)


def test_drift_observation_shares_its_moments_and_changes_nothing(demo_module: torch.nn.Module) -> None:
    """With drift signals on, graded-bn reuses the batch moments the observer computed for
    the same layer input; outputs and state stay bit-identical to a run without them."""
    gen = torch.Generator().manual_seed(5)
    watched, plain = Engine(demo_module, "graded-bn"), Engine(demo_module, "graded-bn", track_drift=False)
    for step in range(6):
        x = torch.rand(32, 1, 28, 28, generator=gen) * (0.2 + 0.1 * step)
        assert torch.equal(watched.predict(x, session="s"), plain.predict(x, session="s"))
    a, b = watched.sessions.get("s").state, plain.sessions.get("s").state
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_fresh_session_does_not_trust_a_one_class_first_batch_the_model_is_sure_of(
        demo_module: torch.nn.Module) -> None:
    """64 clean sandals as a session's first batch: the source model is sure of them, so
    graded-bn answers exactly as source (trust 0); without the probe the batch set the
    shallow layers' statistics and most of them were misclassified."""
    images, labels = load_split("test")
    sandals = images[labels == 5][:64]
    source = Engine(demo_module, "source").predict(sandals)
    probed = Engine(demo_module, "graded-bn").predict(sandals, session="s")
    assert torch.equal(probed, source)
    trusting = Engine(demo_module, "graded-bn", probe_first=False).predict(sandals, session="s")
    assert (trusting.argmax(1) != 5).sum() > (source.argmax(1) != 5).sum() + 10


def test_the_probe_still_trusts_a_first_batch_the_shift_makes_the_model_unsure_of(
        demo_module: torch.nn.Module) -> None:
    images, _ = load_split("test")
    noisy = corrupt(images[:64], "gaussian_noise", 5, seed=0)
    engine = Engine(demo_module, "graded-bn")
    assert not torch.equal(engine.predict(noisy, session="s"), Engine(demo_module, "source").predict(noisy))
