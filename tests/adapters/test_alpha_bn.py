"""alpha-bn / tbn / source: the properties docs/POLICIES.md lists."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny
from ttaserve import Engine
from ttaserve.adapters import PolicyError, PreparedModel, TensorState, create_adapter, prepare


def _run(model: PreparedModel, policy: str, x: torch.Tensor, **params: float) -> torch.Tensor:
    adapter = create_adapter(policy, model, **params)
    return adapter.forward(model, x, TensorState())


def _tbn_reference(x: torch.Tensor) -> torch.Tensor:
    """The original network with BatchNorm in train mode (batch statistics), no update."""
    net = make_tiny()
    net.train()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = None
    with torch.no_grad():
        return net(x)


def test_alpha_one_is_source(tiny: PreparedModel, images: torch.Tensor) -> None:
    expected = _run(tiny, "source", images)
    assert torch.equal(_run(tiny, "alpha-bn", images, alpha=1.0), expected)
    # source is the original network: to float rounding in the channels-last layout the
    # prepared model runs in, bit for bit in the original layout
    torch.testing.assert_close(expected, make_tiny()(images), rtol=0, atol=1e-5)
    contiguous = prepare(make_tiny(), channels_last=False)
    assert torch.equal(_run(contiguous, "alpha-bn", images, alpha=1.0), make_tiny()(images))
    assert torch.equal(_run(contiguous, "source", images), make_tiny()(images))


def test_alpha_zero_is_tbn(tiny: PreparedModel, images: torch.Tensor) -> None:
    torch.testing.assert_close(_run(tiny, "alpha-bn", images, alpha=0.0), _tbn_reference(images),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(_run(tiny, "tbn", images), _run(tiny, "alpha-bn", images, alpha=0.0))


def test_alpha_mixes_statistics_linearly(tiny: PreparedModel) -> None:
    """With one BN layer directly on the input, the output is an explicit formula."""
    layer = tiny.bn_layers[0]
    z = torch.randn(6, layer.num_features, 5, 5)
    var_t, mean_t = torch.var_mean(z, dim=(0, 2, 3), correction=0)
    alpha = 0.3
    from ttaserve.adapters.alpha_bn import alpha_bn_norm

    out = alpha_bn_norm(alpha)(layer, z)
    m = alpha * layer.running_mean + (1 - alpha) * mean_t
    v = alpha * layer.running_var + (1 - alpha) * var_t
    expected = (z - m[None, :, None, None]) / torch.sqrt(v[None, :, None, None] + layer.eps)
    expected = expected * layer.weight[None, :, None, None] + layer.bias[None, :, None, None]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_same_batch_twice_same_output_and_stateless(tiny: PreparedModel, images: torch.Tensor) -> None:
    engine = Engine(tiny, "alpha-bn", alpha=0.2)
    first = engine.predict(images, session="a")
    assert torch.equal(engine.predict(images, session="a"), first)
    assert engine.sessions.get("a").state.nbytes() == 0


def test_train_and_eval_mode_give_the_same_output(tiny: PreparedModel, images: torch.Tensor) -> None:
    eval_out = _run(tiny, "alpha-bn", images, alpha=0.5)
    tiny.module.train()
    try:
        assert torch.equal(_run(tiny, "alpha-bn", images, alpha=0.5), eval_out)
    finally:
        tiny.module.eval()


def test_batch_size_one_uses_instance_statistics(tiny: PreparedModel, images: torch.Tensor) -> None:
    single = images[:1]
    out = _run(tiny, "tbn", single)
    assert out.shape == (1, 3) and torch.isfinite(out).all()
    torch.testing.assert_close(out, _tbn_reference(single), rtol=1e-5, atol=1e-5)


def test_source_output_is_independent_of_the_batch(tiny: PreparedModel, images: torch.Tensor) -> None:
    whole = _run(tiny, "source", images)
    torch.testing.assert_close(_run(tiny, "source", images[:3]), whole[:3], rtol=0, atol=1e-6)


def test_model_weights_are_never_modified(tiny: PreparedModel, images: torch.Tensor) -> None:
    before = {k: v.clone() for k, v in tiny.module.state_dict().items()}
    Engine(tiny, "tbn").predict(images, session=1)
    assert all(torch.equal(before[k], v) for k, v in tiny.module.state_dict().items())


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_outside_unit_interval_is_rejected(alpha: float) -> None:
    with pytest.raises(PolicyError, match=r"alpha must be in \[0, 1\]"):
        create_adapter("alpha-bn", alpha=alpha)


def test_tbn_alias_fixes_alpha() -> None:
    with pytest.raises(PolicyError, match="fixes alpha=0.0"):
        create_adapter("tbn", alpha=0.5)
    with pytest.raises(PolicyError, match="no parameter"):
        create_adapter("alpha-bn", beta=0.5)


def test_bn_policy_on_a_model_without_batchnorm_fails_clearly() -> None:
    from ttaserve.adapters import ModelError

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    net(torch.rand(1, 1, 5, 5))
    with pytest.raises(ModelError, match="no BatchNorm2d"):
        Engine(net, "alpha-bn")
    Engine(net, "source")  # source works on anything


def test_drift_observation_shares_its_moments_alone_and_in_a_shared_pass(demo_module: torch.nn.Module,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """alpha-bn normalizes with the batch moments the drift observer computed for the same
    layer input (per request segment in a shared pass): bit-identical to a run without drift
    signals, and each layer's moments computed once per segment."""
    import ttaserve.adapters.model as model
    import ttaserve.kernels.norm as norm
    from ttaserve.batching import Request

    gen = torch.Generator().manual_seed(3)
    xs = [torch.rand(n, 1, 28, 28, generator=gen) * 0.5 for n in (16, 5, 9)]
    watched, plain = Engine(demo_module, "alpha-bn"), Engine(demo_module, "alpha-bn", track_drift=False)
    assert torch.equal(watched.predict(xs[0]), plain.predict(xs[0]))
    calls = []
    moments = norm.batch_moments
    counted = lambda z: calls.append(z.shape[0]) or moments(z)  # noqa: E731
    monkeypatch.setattr(norm, "batch_moments", counted)  # the kernels' segment moments
    monkeypatch.setattr(model, "batch_moments", counted)  # the drift observer's
    together = watched.predict_many([Request(x, f"s{i}") for i, x in enumerate(xs)])
    apart = plain.predict_many([Request(x, f"s{i}") for i, x in enumerate(xs)])
    assert all(torch.equal(a.logits, b.logits) for a, b in zip(together, apart))  # type: ignore[union-attr]
    layers = len(watched.model.bn_layers)
    assert len(calls) == 2 * 3 * layers  # once per layer and segment in each engine's pass
