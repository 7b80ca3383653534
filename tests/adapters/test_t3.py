"""t3 / t3-b: JS-guided merging of the served expert with its generalist twin."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from tests.conftest import make_tiny
from ttaserve.adapters import (
    Adapter,
    ModelError,
    PolicyError,
    PreparedModel,
    create_adapter,
    prepare,
)
from ttaserve.adapters.t3 import T3Params, js_divergence, merge_state, merging_coefficient
from ttaserve.engine import Engine

LN2 = math.log(2.0)
POLICIES = ("t3", "t3-b")


def twins(expert: nn.Module, generalist: nn.Module) -> PreparedModel:
    model = prepare(expert)
    model.artifacts["t3.generalist"] = prepare(generalist)
    return model


@pytest.fixture
def pair() -> PreparedModel:
    return twins(make_tiny(0), make_tiny(1))


def source_logits(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return prepare(module)(x)


def interpolated(expert: nn.Module, generalist: nn.Module, c: float, build=make_tiny) -> nn.Module:
    """A fresh ``build()`` model whose weights and BN buffers are c*pt + (1-c)*ft."""
    merged = build(0)
    pt = generalist.state_dict()
    merged.load_state_dict(
        {k: c * pt[k] + (1 - c) * v if v.is_floating_point() else v for k, v in expert.state_dict().items()}
    )
    return merged.eval()


def bn1d_net(seed: int) -> nn.Module:
    """A model with a BatchNorm1d in its head, to cover 2-D merged normalization."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3),
    )
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def run(model: PreparedModel, policy: str | Adapter, x: torch.Tensor, **params: object) -> torch.Tensor:
    adapter = create_adapter(policy, model, **params) if isinstance(policy, str) else policy
    return adapter.forward(model, x, adapter.init_state(model))


# -- JS divergence and the merging coefficient ------------------------------------------
def test_js_is_zero_on_equal_inputs_symmetric_and_bounded() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = 3 * torch.randn(64, 10, generator=gen), 3 * torch.randn(64, 10, generator=gen)
    assert torch.allclose(js_divergence(a, a), torch.zeros(64), atol=1e-6)
    assert torch.allclose(js_divergence(a, b), js_divergence(b, a), atol=1e-7)
    js = js_divergence(a, b)
    assert (js >= 0).all() and (js <= LN2).all() and js.max() > 0.1
    # disjoint one-hot predictions reach the bound ln 2 (and stay finite)
    hard = js_divergence(torch.tensor([[100.0, -100.0]]), torch.tensor([[-100.0, 100.0]]))
    assert hard.item() == pytest.approx(LN2, abs=1e-6)


@pytest.mark.parametrize("rescale", [False, True])
def test_lambda_is_monotone_in_js_and_stays_in_its_band(rescale: bool) -> None:
    params = T3Params(lambda_min=0.2, lambda_max=0.9, rescale=rescale)
    js = torch.linspace(0.0, LN2, 101)
    lam = merging_coefficient(js, params)
    assert (lam[1:] > lam[:-1]).all()
    band = 0.7 * (torch.sigmoid(torch.tensor(0.5 * LN2)).item() - 0.5)
    low, high = (0.2, 0.9) if rescale else (0.2 + 0.35, 0.2 + 0.35 + band)
    assert lam[0].item() == pytest.approx(low, abs=1e-6)
    assert lam[-1].item() == pytest.approx(high, abs=1e-6)


def test_invalid_parameters_are_rejected(pair: PreparedModel) -> None:
    with pytest.raises(PolicyError):
        create_adapter("t3", pair, lambda_min=0.8, lambda_max=0.2)
    with pytest.raises(PolicyError):
        create_adapter("t3-b", pair, gamma=0.0)


# -- merging -----------------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("bounds", [(0.0, 0.0), (0.3, 0.3), (1.0, 1.0), (0.0, 1.0)])
def test_identical_twins_give_either_model(policy: str, bounds: tuple[float, float], images: torch.Tensor) -> None:
    model = twins(make_tiny(0), make_tiny(0))
    out = run(model, policy, images, lambda_min=bounds[0], lambda_max=bounds[1], rescale=True)
    assert torch.allclose(out, source_logits(make_tiny(0), images), atol=1e-5)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("c", [0.0, 0.25, 0.7, 1.0])
@pytest.mark.parametrize("build", [make_tiny, bn1d_net])
def test_equal_bounds_are_static_interpolation(policy: str, c: float, build, images: torch.Tensor) -> None:
    expert, generalist = build(0), build(1)
    out = run(twins(expert, generalist), policy, images, lambda_min=c, lambda_max=c)
    reference = source_logits(interpolated(expert, generalist, c, build), images)
    assert torch.allclose(out, reference, atol=1e-5)


def test_every_merged_parameter_lies_between_the_twins() -> None:
    expert, generalist = make_tiny(0), make_tiny(1)
    ft, pt = expert.state_dict(), generalist.state_dict()
    for lam in (0.0, 0.13, 0.5, 0.87, 1.0):
        merged = merge_state(expert, generalist, lam)
        assert merged.keys() == ft.keys()
        for name, value in merged.items():
            low, high = torch.minimum(ft[name], pt[name]), torch.maximum(ft[name], pt[name])
            assert (value >= low).all() and (value <= high).all(), (lam, name)
    assert all(torch.equal(v, ft[k]) for k, v in merge_state(expert, generalist, 0.0).items())
    assert all(torch.equal(v, pt[k]) for k, v in merge_state(expert, generalist, 1.0).items())


def test_batch_variant_at_batch_size_one_equals_per_sample(pair: PreparedModel, images: torch.Tensor) -> None:
    t3, t3b = create_adapter("t3", pair), create_adapter("t3-b", pair)
    for b in range(len(images)):
        one = images[b : b + 1]
        assert torch.allclose(run(pair, t3b, one), run(pair, t3, one), atol=1e-5)


def test_per_sample_result_is_t3b_on_that_sample_alone(pair: PreparedModel, images: torch.Tensor) -> None:
    t3, t3b = create_adapter("t3", pair), create_adapter("t3-b", pair)
    batch = run(pair, t3, images)
    for b in range(len(images)):
        assert torch.allclose(batch[b : b + 1], run(pair, t3b, images[b : b + 1]), atol=1e-5)
        assert torch.allclose(batch[b : b + 1], run(pair, t3, images[b : b + 1]), atol=1e-6)


def test_batch_variant_merges_with_the_mean_lambda(pair: PreparedModel, images: torch.Tensor) -> None:
    params = T3Params(rescale=True)
    js = js_divergence(source_logits(make_tiny(1), images), source_logits(make_tiny(0), images))
    c = merging_coefficient(js, params).mean().item()
    reference = source_logits(interpolated(make_tiny(0), make_tiny(1), c), images)
    assert torch.allclose(run(pair, "t3-b", images, rescale=True), reference, atol=1e-5)


def test_shared_models_are_not_modified(pair: PreparedModel, images: torch.Tensor) -> None:
    generalist = pair.artifact("t3.generalist")
    before = [{k: v.clone() for k, v in m.module.state_dict().items()} for m in (pair, generalist)]
    for policy in POLICIES:
        run(pair, policy, images)
    for snapshot, m in zip(before, (pair, generalist), strict=True):
        assert all(torch.equal(v, m.module.state_dict()[k]) for k, v in snapshot.items())


# -- model checks ------------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
def test_models_that_cannot_be_merged_are_rejected(policy: str) -> None:
    with pytest.raises(ModelError, match="t3.generalist"):
        create_adapter(policy, prepare(make_tiny(0)))
    with pytest.raises(ModelError, match="names/shapes"):
        create_adapter(policy, twins(make_tiny(0), make_tiny(1, channels=5)))
    with pytest.raises(ModelError, match="PreparedModel"):
        model = prepare(make_tiny(0))
        model.artifacts["t3.generalist"] = lambda: make_tiny(1)  # a plain module, not prepared
        create_adapter(policy, model)

    def with_layer_norm(seed: int) -> nn.Module:
        net = make_tiny(seed)
        net.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(4))
        return net

    with pytest.raises(ModelError, match="LayerNorm"):
        create_adapter(policy, twins(with_layer_norm(0), with_layer_norm(1)))


# -- state, determinism, sessions --------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
def test_deterministic_and_reset_restores_exactly(policy: str, pair: PreparedModel, images: torch.Tensor) -> None:
    adapter = create_adapter(policy, pair)
    fresh = adapter.init_state(pair).state_dict()
    state = adapter.init_state(pair)
    first = adapter.forward(pair, images, state)
    assert torch.equal(first, create_adapter(policy, pair).forward(pair, images, adapter.init_state(pair)))
    adapter.forward(pair, images.flip(0), state)
    assert int(state["batches"]) == 2
    reset = adapter.init_state(pair)
    assert all(torch.equal(reset[k], v) for k, v in fresh.items())
    assert torch.equal(adapter.forward(pair, images, reset), first)


@pytest.mark.parametrize("policy", POLICIES)
def test_state_round_trip_and_adapt_false(policy: str, pair: PreparedModel, images: torch.Tensor) -> None:
    adapter = create_adapter(policy, pair)
    state = adapter.init_state(pair)
    adapter.forward(pair, images[:4], state)
    restored = adapter.init_state(pair)
    restored.load_state_dict(state.state_dict())
    a, b = adapter.forward(pair, images[4:], state), adapter.forward(pair, images[4:], restored)
    assert torch.equal(a, b) and all(torch.equal(state[k], restored[k]) for k in state)
    before = state.state_dict()
    assert torch.equal(adapter.forward(pair, images[4:], state, adapt=False), a)
    assert all(torch.equal(state[k], v) for k, v in before.items())


def test_signals_report_the_lambda_ema(pair: PreparedModel, images: torch.Tensor) -> None:
    adapter = create_adapter("t3", pair, ema_momentum=0.25, rescale=True)
    state = adapter.init_state(pair)
    assert adapter.signals(state) == {}
    js_of = lambda x: js_divergence(source_logits(make_tiny(1), x), source_logits(make_tiny(0), x))  # noqa: E731
    lams = [merging_coefficient(js_of(x), adapter.params).mean().item() for x in (images[:4], images[4:])]
    adapter.forward(pair, images[:4], state)
    adapter.forward(pair, images[4:], state)
    signals = adapter.signals(state)
    assert signals["lambda_last"] == pytest.approx(lams[1], abs=1e-6)
    assert signals["lambda_ema"] == pytest.approx(0.75 * lams[0] + 0.25 * lams[1], abs=1e-6)
    stateless = create_adapter("t3", pair, ema_momentum=0.0)
    assert len(stateless.init_state(pair)) == 0


def test_interleaved_sessions_equal_each_alone(pair: PreparedModel, images: torch.Tensor) -> None:
    batches = [images[:3], images[3:], images.flip(0)]
    alone = {}
    for policy in ("t3", "t3-b", "source"):
        engine = Engine(pair, policy="source")
        alone[policy] = [engine.predict(x, session="s", policy=policy) for x in batches]
    engine = Engine(pair, policy="source")
    for i, x in enumerate(batches):
        for policy in ("t3", "t3-b", "source"):
            assert torch.equal(engine.predict(x, session=policy, policy=policy if i == 0 else None), alone[policy][i])


# -- the demo twins on real data ---------------------------------------------------------
@pytest.fixture
def one_thread() -> Iterator[None]:
    # CPU test machines are shared; intra-op threads fighting over them slow this test ~10x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_demo_twins_disagree_more_under_noise_and_t3_beats_the_expert_there(demo_module: nn.Module) -> None:
    from ttaserve.data import load_split

    x, y = load_split("test")
    x, y = x[:128], y[:128]
    noisy = (x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    engine = Engine(demo_module, policy="t3")
    adapter = engine.adapter(engine.default)
    errors, lam = {}, {}
    for name, data in (("clean", x), ("noisy", noisy)):
        state = adapter.init_state(engine.model)
        errors[name] = (adapter.forward(engine.model, data, state).argmax(1) != y).float().mean().item()
        lam[name] = adapter.signals(state)["lambda_last"]
    expert_noisy = (source_logits(demo_module, noisy).argmax(1) != y).float().mean().item()
    assert lam["noisy"] > lam["clean"]
    assert errors["noisy"] < expert_noisy
