"""Every registered policy, and the example policy of docs/POLICIES.md, on the demo model:
the contract of adapters/base.py."""

from __future__ import annotations

import pytest
import torch

from ttaserve.adapters import PreparedModel, TensorState, create_adapter, policy_names, prepare


@pytest.fixture(scope="module")
def model(demo_module: torch.nn.Module) -> PreparedModel:
    return prepare(demo_module)


def _stream(n: int = 3, batch: int = 8) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    clean = torch.rand(n, batch, 1, 28, 28, generator=gen)
    return [(x + 0.4 * torch.randn(x.shape, generator=gen)).clamp(0, 1) for x in clean]


def _equal(a: TensorState, b: TensorState) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("policy", policy_names())
def test_policy_contract(model: PreparedModel, policy: str) -> None:
    _check_contract(model, policy)


def test_the_example_policy_meets_the_contract(model: PreparedModel, example_policy: str) -> None:
    _check_contract(model, example_policy)


def _check_contract(model: PreparedModel, policy: str) -> None:
    adapter = create_adapter(policy, model)
    weights = {k: v.clone() for k, v in model.module.state_dict().items()}
    state = adapter.init_state(model)
    initial = TensorState(state.state_dict())
    outputs = []
    for x in _stream():
        out = adapter.forward(model, x, state)
        assert out.shape == (x.shape[0], model.num_classes) and torch.isfinite(out).all()
        outputs.append(out.detach())

    # determinism: a fresh state on the same stream gives the same outputs
    again = adapter.init_state(model)
    assert _equal(again, initial), "init_state must be deterministic (reset == init_state)"
    for x, expected in zip(_stream(), outputs):
        assert torch.equal(adapter.forward(model, x, again).detach(), expected)

    # snapshot round trip: the next prediction is bit-identical
    restored = adapter.init_state(model)
    restored.load_state_dict(state.state_dict())
    probe = _stream(1)[0].flip(0)
    assert torch.equal(adapter.forward(model, probe, restored).detach(),
                       adapter.forward(model, probe, state).detach())

    # adapt=False predicts without touching the state
    snapshot = TensorState(state.state_dict())
    adapter.forward(model, probe, state, adapt=False)
    assert _equal(state, snapshot)

    # the shared model is never modified
    assert all(torch.equal(weights[k], v) for k, v in model.module.state_dict().items())
    assert isinstance(adapter.signals(state), dict)
