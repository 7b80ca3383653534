"""ecotta: meta networks around a frozen model (docs/POLICIES.md, "ecotta")."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.conftest import randomize_bn
from ttaserve.adapters import ModelError, PreparedModel, create_adapter, normalizer, prepare
from ttaserve.adapters.ecotta import (
    build_meta_artifact,
    ecotta_loss,
    encoder_blocks,
    meta_forward,
    partition_modules,
    trainable_names,
    warm_up,
)
from ttaserve.engine import Engine


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class StagedNet(nn.Module):
    """stem -> stages (3 blocks, one downsampling) -> pool -> head, like the demo model."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.stages = nn.ModuleList([Block(4, 4), nn.Sequential(Block(4, 6, 2), Block(6, 6))])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(self.pool(x))


def staged_module(seed: int = 0) -> StagedNet:
    torch.manual_seed(seed)
    return randomize_bn(StagedNet())  # type: ignore[return-value]


def meta_tensors(model: PreparedModel, partitions: int = 2) -> dict[str, torch.Tensor]:
    """A few warm-up steps on random data, then non-zero conv blocks (init has them at 0)."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(64, 1, 12, 12, generator=g), torch.randint(0, 3, (64,), generator=g)
    meta = warm_up(model, x, y, steps=2, batch_size=16, partitions=partitions)
    for name in meta:
        if name.endswith("conv_bn.weight"):
            meta[name] = torch.rand(meta[name].shape, generator=g) + 0.5
    return meta


@pytest.fixture(autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    """Backward passes on a shared 2-core machine run far faster without intra-op threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def staged() -> tuple[StagedNet, dict[str, torch.Tensor]]:
    module = staged_module()
    return module, meta_tensors(prepare(module))


@pytest.fixture
def model(staged: tuple[StagedNet, dict[str, torch.Tensor]]) -> PreparedModel:
    module, meta = staged
    prepared = prepare(module)
    prepared.artifacts["ecotta.meta"] = meta
    return prepared


def batch(seed: int = 1, n: int = 8) -> torch.Tensor:
    return torch.rand(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed))


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- structure ---------------------------------------------------------------------------
def test_partitions_are_contiguous_and_denser_in_shallow_layers(demo_module: nn.Module) -> None:
    blocks = encoder_blocks(demo_module)
    assert len(blocks) == 4  # stage 1 is split into its two BasicBlocks
    assert [len(g) for g in partition_modules(demo_module, 4)] == [1, 1, 1, 1]
    assert [len(g) for g in partition_modules(demo_module, 3)] == [1, 1, 2]
    assert [b for g in partition_modules(demo_module, 3) for b in g] == blocks
    assert len(encoder_blocks(staged_module())) == 3  # a Sequential of leaves stays one block


def test_model_without_stem_stages_pool_head_is_rejected() -> None:
    flat = prepare(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3)))
    with pytest.raises(ModelError, match="stem, stages"):
        create_adapter("ecotta", flat)


def test_artifact_must_exist_and_match_partitions(model: PreparedModel) -> None:
    with pytest.raises(ModelError, match="2 meta networks"):
        create_adapter("ecotta", model, partitions=3).init_state(model)
    bare = prepare(staged_module())
    with pytest.raises(ModelError, match="ecotta.meta"):
        create_adapter("ecotta", bare).init_state(bare)


# -- properties (docs/POLICIES.md, "ecotta") ------------------------------------------------
@pytest.mark.parametrize("partitions", [1, 2, 3])
def test_zero_conv_blocks_and_identity_meta_bn_equal_original(partitions: int) -> None:
    prepared = prepare(staged_module())
    meta = meta_tensors(prepared, partitions)
    for k in range(partitions):
        for name in ("conv.weight", "conv_bn.bias", "conv_bn.running_mean", "bn.bias", "bn.running_mean"):
            meta[f"meta.{k}.{name}"].zero_()  # conv block outputs ReLU(0) = 0
        meta[f"meta.{k}.bn.running_var"].fill_(1.0)
        meta[f"meta.{k}.bn.weight"].fill_(math.sqrt(1.0 + 1e-5))  # cancels the BN's eps: identity
    prepared.artifacts["ecotta.meta"] = meta
    policy = create_adapter("ecotta", prepared, meta_bn_stats="running")
    x = batch()
    out = policy.forward(prepared, x, policy.init_state(prepared), adapt=False)
    with torch.no_grad(), normalizer(None):
        torch.testing.assert_close(out, prepared(x), rtol=0, atol=1e-5)


def test_original_parameters_are_bit_identical_after_steps(model: PreparedModel) -> None:
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    policy = create_adapter("ecotta", model, lr=0.1)
    state = policy.init_state(model)
    for seed in range(3):
        policy.forward(model, batch(seed), state)
    assert not same_state(state, policy.init_state(model))  # the meta networks did move
    assert same_state(before, model.module.state_dict())
    assert all(p.grad is None for p in model.module.parameters())


def test_filtered_samples_get_exactly_zero_gradient() -> None:
    logits = torch.tensor([[8.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 0.2]])
    logits.requires_grad_(True)
    loss, kept = ecotta_loss(logits, [], margin=0.4, lam=0.0)
    (grad,) = torch.autograd.grad(loss, logits)
    assert int(kept) == 2
    assert torch.equal(grad[1], torch.zeros(3)) and torch.equal(grad[3], torch.zeros(3))
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0


def test_no_sample_passing_gives_zero_loss_and_no_update(model: PreparedModel) -> None:
    policy = create_adapter("ecotta", model, lam=0.0, entropy_margin=1e-9, lr=1.0)
    state = policy.init_state(model)
    policy.forward(model, batch(), state)
    assert float(state["stats.loss"]) == 0.0 and float(state["stats.kept"]) == 0.0
    for name in trainable_names(state):
        assert torch.equal(state[name], policy.init_state(model)[name])


def test_step_is_sgd_with_momentum_on_the_loss(model: PreparedModel) -> None:
    policy = create_adapter("ecotta", model, lr=0.05, lam=0.7)
    state = policy.init_state(model)
    names = trainable_names(state)
    params = {n: state[n].clone() for n in names}
    velocity = {n: torch.zeros_like(state[n]) for n in names}
    for seed in (1, 2):  # the second step exercises the momentum buffer
        leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        logits, pairs = meta_forward(model, {**state, **leaves}, batch(seed))
        grads = torch.autograd.grad(ecotta_loss(logits, pairs, 0.4, 0.7)[0], list(leaves.values()))
        for n, g in zip(names, grads):  # torch.optim.SGD's rule without dampening
            velocity[n] = 0.9 * velocity[n] + g
            params[n] = params[n] - 0.05 * velocity[n]
        policy.forward(model, batch(seed), state)
    for n in names:
        torch.testing.assert_close(state[n], params[n], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(state[f"momentum.{n}"], velocity[n], rtol=1e-5, atol=1e-7)


def saved_activation_bytes(step) -> int:  # type: ignore[no-untyped-def]
    """Bytes autograd keeps for backward during ``step`` (each storage counted once): the
    memory a training step holds at its peak beyond the inference forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def tent_step(model: PreparedModel, x: torch.Tensor) -> None:
    """Minimal TENT: train-mode BN with trainable affine, entropy, one gradient."""
    affine = [(bn.weight.detach().clone().requires_grad_(), bn.bias.detach().clone().requires_grad_())
              for bn in model.bn_layers]

    def train_bn(layer, z):  # type: ignore[no-untyped-def]
        w, b = affine[layer.index]
        return nn.functional.batch_norm(z, None, None, w, b, True, 0.0, layer.eps)

    with torch.enable_grad(), normalizer(train_bn):
        log_p = model(x).log_softmax(1)
        loss = -(log_p.exp() * log_p).sum(1).mean()
    torch.autograd.grad(loss, [t for pair in affine for t in pair])


def test_step_keeps_less_for_backward_than_tent(demo_module: nn.Module) -> None:
    model = prepare(demo_module)
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    policy = create_adapter("ecotta", model)
    state = policy.init_state(model)
    ecotta_bytes = saved_activation_bytes(lambda: policy.forward(model, x, state))
    tent_bytes = saved_activation_bytes(lambda: tent_step(model, x))
    assert 0 < ecotta_bytes < tent_bytes


# -- general policy contract -------------------------------------------------------------
def test_same_input_and_state_give_same_output(model: PreparedModel) -> None:
    policy = create_adapter("ecotta", model)
    s1, s2 = policy.init_state(model), policy.init_state(model)
    for seed in range(3):
        assert torch.equal(policy.forward(model, batch(seed), s1), policy.forward(model, batch(seed), s2))
    assert same_state(s1, s2)


def test_predicts_before_adapting_and_adapt_false_keeps_state(model: PreparedModel) -> None:
    policy = create_adapter("ecotta", model, lr=0.1)
    state = policy.init_state(model)
    frozen = policy.forward(model, batch(), state, adapt=False)
    assert same_state(state, policy.init_state(model))
    assert torch.equal(policy.forward(model, batch(), state), frozen)  # logits from before the step
    assert not torch.equal(policy.forward(model, batch(), state, adapt=False), frozen)


def test_reset_restores_exactly(model: PreparedModel) -> None:
    policy = create_adapter("ecotta", model)
    first = policy.forward(model, batch(), policy.init_state(model))
    state = policy.init_state(model)
    for seed in range(3):
        policy.forward(model, batch(seed), state)
    state = policy.init_state(model)  # reset
    assert torch.equal(policy.forward(model, batch(), state), first)


def test_state_round_trip_gives_identical_next_prediction(model: PreparedModel) -> None:
    policy = create_adapter("ecotta", model)
    state = policy.init_state(model)
    policy.forward(model, batch(1), state)
    copy = policy.init_state(model)
    copy.load_state_dict(state.state_dict())
    assert torch.equal(policy.forward(model, batch(2), state), policy.forward(model, batch(2), copy))
    assert same_state(state, copy)


def test_interleaved_sessions_equal_each_alone(staged: tuple[StagedNet, dict[str, torch.Tensor]]) -> None:
    module, meta = staged
    module.ttaserve_artifacts = {"ecotta.meta": lambda: meta}  # type: ignore[assignment]
    both, eco, tbn = Engine(module), Engine(module), Engine(module)
    for seed in range(3):
        x = batch(seed)
        a = both.predict(x, session="a", policy="ecotta")
        b = both.predict(x, session="b", policy="tbn")
        assert torch.equal(a, eco.predict(x, session="a", policy="ecotta"))
        assert torch.equal(b, tbn.predict(x, session="b", policy="tbn"))


def test_batch_of_one_and_signals(model: PreparedModel) -> None:
    policy = create_adapter("ecotta", model)
    state = policy.init_state(model)
    out = policy.forward(model, batch(n=1), state)
    assert out.shape == (1, 3) and torch.isfinite(out).all()
    signals = policy.signals(state)
    assert signals["steps"] == 1.0 and all(math.isfinite(v) for v in signals.values())


def test_build_meta_artifact_writes_a_loadable_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    data = (torch.rand(32, 1, 12, 12, generator=g), torch.randint(0, 3, (32,), generator=g))
    path = str(tmp_path / "meta.safetensors")
    tensors = build_meta_artifact(staged_module(), data, path, partitions=4, steps=2)
    loaded = load_file(path)
    assert same_state(tensors, loaded) and len(trainable_names(loaded)) == 3 * 5  # 3 blocks


# -- the demo model, real data -----------------------------------------------------------
def test_demo_warmed_up_meta_networks_adapt_to_noise() -> None:
    from ttaserve.data import load_split
    from ttaserve.models import demo

    x, y = load_split("test")
    x, y = x[:512], y[:512]
    noisy = (x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    engine = Engine(demo(), policy="ecotta")
    wrong = {"source": 0, "ecotta": 0, "clean": 0}
    for i in range(0, 512, 64):
        wrong["source"] += int((engine.predict(noisy[i : i + 64], policy="source").argmax(1) != y[i : i + 64]).sum())
        wrong["ecotta"] += int((engine.predict(noisy[i : i + 64], session="n").argmax(1) != y[i : i + 64]).sum())
        wrong["clean"] += int((engine.predict(x[i : i + 64], session="c").argmax(1) != y[i : i + 64]).sum())
    assert wrong["ecotta"] < 0.85 * wrong["source"]  # measured: 353 vs 446 of 512
    assert wrong["clean"] / 512 < 0.12  # adaptation on clean data stays near the 7.6 % source error
