"""Drift signals: the vectorized per-layer divergence equals the definition, layer by layer."""

from __future__ import annotations

import torch

from ttaserve.adapters.guard import all_finite
from ttaserve.adapters.model import observe_moments, prepare
from ttaserve.drift import divergence_rows, symmetric_kl
from ttaserve.engine import layer_divergence


def _by_definition(moments: list, segment: int | None = None) -> dict[str, float]:
    """Mean over channels of the symmetric KL, one layer at a time (the specification)."""
    sums: dict[str, list[float]] = {}
    for layer, mean, var in moments:
        if segment is not None:
            mean, var = mean[segment], var[segment]
        value = float(symmetric_kl(mean, var, layer.running_mean, layer.running_var).mean())
        sums.setdefault(layer.layer_name, []).append(value)
    return {name: sum(v) / len(v) for name, v in sums.items()}


def test_layer_divergence_equals_the_per_layer_definition(demo_module: torch.nn.Module) -> None:
    model = prepare(demo_module)
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 0.6
    with torch.no_grad(), observe_moments() as moments:
        model(x)
    got, want = layer_divergence(moments), _by_definition(moments)
    assert list(got) == list(want) and len(got) == len(model.bn_layers)
    for name in want:
        assert abs(got[name] - want[name]) <= 1e-5 * max(1.0, abs(want[name]))
    assert moments.divergence is not None  # computed once, kept with the pass's moments


def test_segmented_divergence_rows_equal_each_segment_alone(demo_module: torch.nn.Module) -> None:
    model = prepare(demo_module)
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.rand(3, 1, 28, 28, generator=gen), torch.rand(2, 1, 28, 28, generator=gen) * 0.2])
    with torch.no_grad(), observe_moments([0, 3, 5]) as moments:
        model(x)
    rows = divergence_rows(moments)
    assert len(rows) == 2
    for segment in (0, 1):
        want = _by_definition(moments, segment)
        assert layer_divergence(moments, segment) == rows[segment]
        for name in want:
            assert abs(rows[segment][name] - want[name]) <= 1e-5 * max(1.0, abs(want[name]))
    # a layer that runs twice in a pass is averaged over its runs
    layer = moments[0][0]
    twice = [(layer, torch.zeros(layer.num_features), torch.ones(layer.num_features))] * 2
    assert divergence_rows(twice)[0] == divergence_rows(twice[:1])[0]
    assert divergence_rows([]) == [{}]


def test_all_finite_checks_every_floating_tensor_at_once() -> None:
    ok = {"a": torch.zeros(3), "b": torch.ones(2, 2, dtype=torch.float64), "n": torch.arange(3)}
    assert all_finite(ok) and all_finite({}) and all_finite({"n": torch.arange(2)})
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = dict(ok, b=torch.tensor([[1.0, bad], [0.0, 0.0]], dtype=torch.float64))
        assert not all_finite(broken)
        assert not all_finite({"only": torch.tensor(bad)})


def test_a_normalizer_reporting_its_instance_moments_gives_the_observer_the_batch_moments(
        demo_module: torch.nn.Module) -> None:
    """unmix-tns computes per-sample moments anyway and reports them; the observer pools
    them (law of total variance) instead of two more passes: the same batch moments."""
    from ttaserve.adapters import create_adapter
    from ttaserve.adapters.model import normalizer

    model = prepare(demo_module)
    adapter = create_adapter("unmix-tns", model)
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(2)) * 0.7
    hook = adapter.normalization(model, adapter.init_state(model), x).hook
    assert getattr(hook, "reports_moments", False)
    with torch.no_grad(), normalizer(hook), observe_moments() as reported:
        out = model(x)
    with torch.no_grad(), normalizer(lambda layer, z: hook(layer, z)), observe_moments() as computed:
        assert torch.equal(model(x), out)  # reporting changes nothing of the output
    assert len(reported) == len(computed) == len(model.bn_layers)
    for (la, ma, va), (lb, mb, vb) in zip(reported, computed):
        assert la is lb
        torch.testing.assert_close(ma, mb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6)
