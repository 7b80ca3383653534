"""ONNX Runtime backend: the same per-session semantics as the torch path.

The demo model is exported once per test session with ``ttaserve export-onnx``'s code
(tests/conftest.py: ``demo_onnx_repo``); every comparison runs the torch Engine and the
ONNX Engine side by side on the same stream."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ttaserve import Engine
from ttaserve.adapters import ModelError, TensorState, Unsupported
from ttaserve.batching import Prediction, Request
from ttaserve.handlers.loader import load_model_dir
from ttaserve.handlers.onnx_model import OnnxModel

TOL = 1e-4
# (policy, parameters): every policy that runs on ONNX Runtime, aliases included.
SUPPORTED = [("source", {}), ("alpha-bn", {}), ("tbn", {}), ("unmix-tns", {}), ("adanpc", {}),
             ("adanpc", {"beta": 0.0, "capacity": 300}), ("graded-bn", {}),
             ("graded-bn", {"prior_first": 1.0, "prior_last": 64.0, "momentum": 0.05})]


@pytest.fixture(scope="module")
def onnx_model(demo_onnx_repo: Path) -> OnnxModel:
    model = load_model_dir(demo_onnx_repo / "demo-onnx").model
    assert isinstance(model, OnnxModel)
    return model


def stream(batch: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    """A drifting stream: clean-ish images, then noisier and lower-contrast ones."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        x = torch.rand(batch, 1, 28, 28, generator=gen)
        shift = i / max(count - 1, 1)
        x = 0.5 + (x - 0.5) * (1.0 - 0.6 * shift) + 0.3 * shift * torch.randn(x.shape, generator=gen)
        out.append(x.clamp(0, 1))
    return out


def assert_states_close(a: TensorState, b: TensorState) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=TOL)
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("batch,count", [(1, 16), (64, 4)])
@pytest.mark.parametrize("policy,params", SUPPORTED, ids=lambda v: str(v) if v else "")
def test_onnx_stream_matches_torch(demo_module: torch.nn.Module, onnx_model: OnnxModel,
                                   policy: str, params: dict, batch: int, count: int) -> None:
    on_torch, on_onnx = Engine(demo_module, policy, **params), Engine(onnx_model, policy, **params)
    for x in stream(batch, count):
        expected = on_torch.predict(x, session="cam")
        torch.testing.assert_close(on_onnx.predict(x, session="cam"), expected, rtol=0, atol=TOL)
    torch_session, onnx_session = on_torch.sessions.get("cam"), on_onnx.sessions.get("cam")
    assert_states_close(onnx_session.state, torch_session.state)
    assert onnx_session.samples == torch_session.samples == batch * count
    # drift signals come from the graph's moment outputs instead of the torch layers
    got, want = on_onnx.signals_of(onnx_session), on_torch.signals_of(torch_session)
    assert got.keys() == want.keys()
    assert got["norm_divergence"] == pytest.approx(want["norm_divergence"], rel=1e-3)


def test_onnx_layers_carry_the_torch_names_and_statistics(demo_module: torch.nn.Module,
                                                          onnx_model: OnnxModel) -> None:
    torch_layers = {n: m for n, m in demo_module.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert [layer.layer_name for layer in onnx_model.bn_layers] == list(torch_layers)
    for layer in onnx_model.bn_layers:
        source = torch_layers[layer.layer_name]
        assert torch.equal(layer.running_mean, source.running_mean)
        assert torch.equal(layer.running_var, source.running_var)
        assert layer.momentum == pytest.approx(source.momentum) and layer.eps == pytest.approx(source.eps)


@pytest.mark.parametrize("policy", ["unmix-tns", "adanpc"])
def test_sessions_are_isolated_reset_and_restored_exactly(onnx_model: OnnxModel, policy: str) -> None:
    params = {"beta": 0.0} if policy == "adanpc" else {"K": 8}
    xs_a, xs_b = stream(16, 4, seed=1), stream(16, 4, seed=2)
    alone = Engine(onnx_model, policy, **params)
    expected_a = [alone.predict(x, session="a") for x in xs_a]

    engine = Engine(onnx_model, policy, **params)
    for i, (xa, xb) in enumerate(zip(xs_a, xs_b)):  # interleaved with another session
        assert torch.equal(engine.predict(xa, session="a"), expected_a[i])
        engine.predict(xb, session="b")

    snapshot = engine.snapshot("a")
    engine.restore("copy", snapshot)
    assert all(torch.equal(v, engine.sessions.get("a").state[k]) for k, v in engine.sessions.get("copy").state.items())
    probe = stream(16, 1, seed=3)[0]
    assert torch.equal(engine.predict(probe, session="copy"), engine.predict(probe, session="a"))

    engine.reset("a")
    fresh = engine.adapter(engine.default).init_state(onnx_model)
    assert all(torch.equal(v, fresh[k]) for k, v in engine.sessions.get("a").state.items())
    assert torch.equal(engine.predict(xs_a[0], session="a"), expected_a[0])


def test_adapt_false_leaves_the_state_alone(onnx_model: OnnxModel) -> None:
    engine = Engine(onnx_model, "unmix-tns", K=8)
    x = stream(8, 1)[0]
    engine.predict(x, session="s")
    before = engine.sessions.get("s").state.state_dict()
    engine.predict(x * 0.5, session="s", adapt=False)
    assert all(torch.equal(before[k], v) for k, v in engine.sessions.get("s").state.items())


@pytest.mark.parametrize("policy", ["source", "tbn", "alpha-bn", "graded-bn", "unmix-tns"])
def test_cross_session_batching_on_onnx(onnx_model: OnnxModel, policy: str) -> None:
    """source and alpha-bn share one ONNX Runtime run (segment-aware graph); policies whose
    normalizers the graph cannot combine run per session, with the same results."""
    xs = [x[:n] for x, n in zip(stream(16, 4, seed=4), (8, 3, 1, 16))]
    alone = [Engine(onnx_model, policy).predict(x, session=f"s{i}") for i, x in enumerate(xs)]
    together = Engine(onnx_model, policy).predict_many([Request(x, session=f"s{i}") for i, x in enumerate(xs)])
    for a, b in zip(alone, together):
        assert isinstance(b, Prediction)
        torch.testing.assert_close(b.logits, a, rtol=0, atol=1e-5)


@pytest.mark.parametrize("policy", ["tent", "ecotta", "t3", "t3-b"])
def test_gradient_and_merging_policies_are_refused(onnx_model: OnnxModel, policy: str) -> None:
    with pytest.raises(Unsupported, match=rf"policy '{policy}' is not available .* ONNX Runtime.*unmix-tns.*PyTorch model"):
        Engine(onnx_model, policy)
    engine = Engine(onnx_model, "source")
    with pytest.raises(Unsupported):
        engine.predict(stream(2, 1)[0], session="s", policy=policy)
    assert engine.sessions.get("s") is None  # nothing was created


def test_fused_batchnorm_is_refused_for_bn_policies(demo_module: torch.nn.Module, tmp_path: Path) -> None:
    import warnings

    path = tmp_path / "fused.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # torch.onnx.export's defaults in eval mode fold BatchNorm into the convolutions
        torch.onnx.export(demo_module, (torch.rand(2, 1, 28, 28),), str(path), dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "b"}, "logits": {0: "b"}})
    from ttaserve.handlers.onnx_model import load_onnx

    fused = load_onnx(path)
    assert fused.bn_layers == []
    for policy in ("tbn", "alpha-bn", "unmix-tns"):
        with pytest.raises(ModelError, match="folded into the convolutions.*do_constant_folding=False"):
            Engine(fused, policy)
    x = stream(4, 1)[0]
    torch.testing.assert_close(Engine(fused, "source").predict(x), Engine(demo_module, "source").predict(x),
                               rtol=0, atol=TOL)


def test_rewritten_graphs_have_no_batchnorm_left(onnx_model: OnnxModel) -> None:
    import onnx

    from ttaserve.handlers.onnx_rewrite import rewrite
    from ttaserve.handlers.onnx_rules import RULES

    for rule in RULES.values():
        graph = rewrite(onnx_model.info, rule, moments=True, features=True)
        onnx.checker.check_model(graph, full_check=True)
        assert not any(n.op_type == "BatchNormalization" for n in graph.graph.node)
    source = rewrite(onnx_model.info, None, moments=True, features=False)
    assert sum(n.op_type == "BatchNormalization" for n in source.graph.node) == len(onnx_model.bn_layers)


def test_adanpc_needs_a_feature_tensor(demo_onnx_repo: Path) -> None:
    import onnx

    from ttaserve.handlers.onnx_graph import GraphError, analyze

    graph = onnx.load(str(demo_onnx_repo / "demo-onnx" / "model.onnx"))
    with pytest.raises(GraphError, match="'nope' is not a tensor"):
        analyze(graph, features="nope")


def test_providers_are_chosen_automatically_or_from_the_config(demo_onnx_repo: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import shutil

    import onnxruntime

    from ttaserve.handlers.loader import ModelConfigError
    from ttaserve.handlers.onnx_model import choose_providers

    assert choose_providers(None) == ["CPUExecutionProvider"]  # no GPU here
    # No GPU can be lent to this test: the CUDA branch is checked with what onnxruntime-gpu
    # and torch report on a GPU machine standing in for them.
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_providers(None) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.undo()

    entry = tmp_path / "m"
    shutil.copytree(demo_onnx_repo / "demo-onnx", entry)
    config = json.loads((entry / "config.json").read_text())
    (entry / "config.json").write_text(json.dumps({**config, "providers": ["CPUExecutionProvider"]}))
    assert load_model_dir(entry).model.providers == ["CPUExecutionProvider"]  # type: ignore[attr-defined]
    (entry / "config.json").write_text(json.dumps({**config, "providers": ["NoSuchProvider"]}))
    with pytest.raises(ModelConfigError, match="'NoSuchProvider'.* not available here; available"):
        load_model_dir(entry)


def test_rules_are_found_for_normalizer_values_and_their_bound_methods() -> None:
    from ttaserve.adapters.alpha_bn import AlphaBNNorm, alpha_bn_norm
    from ttaserve.handlers.onnx_rules import AlphaBNRule, check_policy, rule_for

    assert rule_for(None) is None
    assert isinstance(rule_for(alpha_bn_norm(0.1)), AlphaBNRule)
    assert isinstance(rule_for(AlphaBNNorm(0.1).__call__), AlphaBNRule)  # a pass object's method
    with pytest.raises(Unsupported, match="no ONNX Runtime rule"):
        rule_for(lambda layer, z: z)
    check_policy("alpha-bn+adanpc")  # a composition runs when every part does
    with pytest.raises(Unsupported, match="policy 'tent'"):
        check_policy("alpha-bn+tent")
