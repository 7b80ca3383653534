"""NORM+PRED compositions: named like any policy, each part behaves as it does alone."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny
from ttaserve import Engine
from ttaserve.adapters import (
    PolicyError,
    TensorState,
    canonical,
    create_adapter,
    param_schema,
    prepare,
)
from ttaserve.adapters.model import normalizer
from ttaserve.adapters.registry import composable


@pytest.fixture(scope="module")
def demo():  # type: ignore[no-untyped-def]
    from ttaserve.models import demo as load

    return prepare(load())


def _stream(batches: int = 4, size: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.rand(size, 1, 28, 28, generator=g) for _ in range(batches)]


def test_names_resolve_like_single_policies() -> None:
    assert canonical("tbn+adanpc", {"k": 7}) == ("alpha-bn+adanpc", {"alpha-bn.alpha": 0.0, "adanpc.k": 7})
    assert canonical("graded-bn+ecotta", {"graded-bn.momentum": 0.01}) == (
        "graded-bn+ecotta", {"graded-bn.momentum": 0.01})
    assert "adanpc.k" in param_schema("alpha-bn+adanpc")
    norms, preds = composable()
    assert {"alpha-bn", "tbn", "unmix-tns", "graded-bn"} <= set(norms)
    assert {"adanpc", "ecotta"} <= set(preds)


@pytest.mark.parametrize(("name", "params", "words"), [
    ("adanpc+alpha-bn", {}, "cannot be the normalization part"),
    ("alpha-bn+tent", {}, "cannot run over"),
    ("alpha-bn+adanpc+ecotta", {}, "two names"),
    ("alpha-bn+nope", {}, "unknown policy"),
    ("alpha-bn+adanpc", {"lr": 1.0}, "neither part"),
    ("graded-bn+ecotta", {"momentum": 0.5}, "both parts"),
    ("alpha-bn+adanpc", {"x.k": 1}, "not a part"),
])
def test_bad_compositions_are_refused_with_a_reason(demo, name: str, params: dict, words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PolicyError, match=words):
        create_adapter(name, demo, **params)


def test_source_norm_under_adanpc_is_adanpc(demo) -> None:  # type: ignore[no-untyped-def]
    """alpha-bn with alpha = 1 normalizes with the source statistics: the composition is
    exactly AdaNPC alone, over a whole stream (its memory grows the same way)."""
    composed = Engine(demo, "alpha-bn+adanpc", **{"alpha-bn.alpha": 1.0})
    alone = Engine(demo, "adanpc")
    for x in _stream():
        assert torch.equal(composed.predict(x, session="s"), alone.predict(x, session="s"))


def test_adanpc_votes_over_the_normalized_features(demo) -> None:  # type: ignore[no-untyped-def]
    """tbn+adanpc's first batch equals AdaNPC run inside tbn's normalizer by hand."""
    x = _stream(1)[0]
    adanpc = create_adapter("adanpc", demo)
    tbn = create_adapter("tbn", demo)
    with normalizer(tbn.normalization(demo, TensorState(), x).hook):
        expected = adanpc.forward(demo, x, adanpc.init_state(demo), adapt=False)
    composed = create_adapter("tbn+adanpc", demo)
    assert torch.equal(composed.forward(demo, x, composed.init_state(demo)), expected)


def test_both_parts_adapt_and_round_trip(demo) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(demo, "graded-bn+adanpc", **{"adanpc.beta": 0.0})
    for x in _stream():
        engine.predict(x, session="s")
    state = engine.sessions.get("s").state  # type: ignore[union-attr]
    assert state["pred.labels"].numel() == 64  # beta 0: every sample remembered
    assert int(state["norm.seen"]) == 64
    restored = Engine(demo, "graded-bn+adanpc", **{"adanpc.beta": 0.0})
    restored.restore("s", engine.snapshot("s"))
    x = _stream(5)[-1]
    assert torch.equal(restored.predict(x, session="s"), engine.predict(x, session="s"))


def test_ecotta_runs_over_a_normalization(demo) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(demo, "graded-bn+ecotta")
    outs = [engine.predict(x, session="s") for x in _stream(2)]
    assert all(torch.isfinite(o).all() for o in outs)
    assert float(engine.sessions.get("s").state["pred.stats.steps"]) == 2  # type: ignore[union-attr]


def test_tiny_model_composition_requires_the_artifact() -> None:
    with pytest.raises(Exception, match="adanpc.memory"):
        create_adapter("alpha-bn+adanpc", prepare(make_tiny()))
