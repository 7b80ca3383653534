"""The kernel switch: which implementation runs, and that the CPU path is the reference."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny
from tests.kernels.conftest import TritonKernels
from ttaserve.adapters import TensorState, create_adapter, prepare
from ttaserve.kernels import reference
from ttaserve.kernels.select import ENV_VAR, NAMES, choose, implementation

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    "device, needs_grad, forced, triton_ok, expected",
    [
        (CPU, False, None, True, "torch"),
        (CUDA, False, None, True, "triton"),
        (CUDA, False, "auto", True, "triton"),
        (CUDA, False, None, False, "torch"),  # no triton: reference on the GPU too
        (CUDA, True, None, True, "torch"),  # Triton kernels have no backward
        (CUDA, False, "torch", True, "torch"),
        (CUDA, False, " Torch ", True, "torch"),
        (CPU, False, "triton", True, "triton"),  # forced: CPU needs TRITON_INTERPRET=1
        (CUDA, True, "triton", True, "torch"),  # gradients win over the override
        (CPU, False, "", True, "torch"),
    ],
)
def test_choice(device: torch.device, needs_grad: bool, forced: str | None, triton_ok: bool, expected: str) -> None:
    assert choose(device, needs_grad, forced, triton_ok) == expected


def test_bad_override_and_missing_triton_are_errors() -> None:
    with pytest.raises(ValueError, match=ENV_VAR):
        choose(CPU, False, "cuda", True)
    with pytest.raises(RuntimeError, match="triton"):
        choose(CUDA, False, "triton", False)
    with pytest.raises(KeyError, match="unknown kernel"):
        implementation("batch_norm")


def test_every_name_has_a_reference_and_one_switch() -> None:
    for name in NAMES:
        assert implementation(name) is implementation(name)
        assert implementation(name).__wrapped__ is getattr(reference, name)  # type: ignore[attr-defined]


@pytest.mark.parametrize("forced", [None, "auto", "torch"])
def test_cpu_tensors_get_the_reference_bit_for_bit(monkeypatch: pytest.MonkeyPatch, forced: str | None) -> None:
    if forced is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, forced)
    g = torch.Generator().manual_seed(0)
    z, mean, var = torch.randn(5, 3, 4, 4, generator=g), torch.randn(3, generator=g), torch.rand(3, generator=g)
    args = (z, [0, 2, 5], mean, var, 0.1, None, None, 1e-5)
    assert torch.equal(implementation("alpha_bn")(*args), reference.alpha_bn(*args))
    query, keys = torch.randn(3, 8, generator=g), torch.randn(20, 8, generator=g)
    for got, want in zip(implementation("knn_topk")(query, keys, 4), reference.knn_topk(query, keys, 4)):
        assert torch.equal(got, want)


def test_forced_triton_runs_the_triton_kernels(triton_kernels: TritonKernels, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "triton")
    g = torch.Generator().manual_seed(1)
    inst_mean, inst_var = torch.randn(4, 6, generator=g), torch.rand(4, 6, generator=g)
    means, variances = torch.randn(3, 6, generator=g), torch.rand(3, 6, generator=g)
    on = triton_kernels.device
    got = implementation("unmix_moments")(inst_mean.to(on), inst_var.to(on), means.to(on), variances.to(on), 0.1)
    want = reference.unmix_moments(inst_mean, inst_var, means, variances, 0.1)
    assert got[0].device.type == triton_kernels.device.type
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)


def test_gradients_keep_the_reference_even_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "triton")
    z = torch.randn(4, 3, 2, 2, requires_grad=True)
    out = implementation("alpha_bn")(z, [0, 1, 4], torch.zeros(3), torch.ones(3), 0.0, None, None, 1e-5)
    out.square().sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("policy, params", [("alpha-bn", {"alpha": 0.2}), ("unmix-tns", {"K": 3})])
def test_policies_agree_across_implementations(
    triton_kernels: TritonKernels, monkeypatch: pytest.MonkeyPatch, policy: str, params: dict[str, float]
) -> None:
    model = prepare(make_tiny())
    adapter = create_adapter(policy, model, **params)
    x = torch.rand(6, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    outputs, states = [], []
    for forced in ("torch", "triton"):
        monkeypatch.setenv(ENV_VAR, forced)
        state = adapter.init_state(model)
        outputs.append(adapter.forward(model, x, state))
        states.append(state)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=1e-4, atol=1e-5)
    assert isinstance(states[0], TensorState)
