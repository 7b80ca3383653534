"""The example policy of docs/POLICIES.md (examples/prior_shift.py): one file is all a new
policy needs. Loaded, it runs through the engine and a real server with nothing else
changed; its behaviour is the paper's correction."""

from __future__ import annotations

import numpy as np
import torch

from tests.server.conftest import infer_input, running_server
from ttaserve import Engine
from ttaserve.adapters import PreparedModel


def test_a_fresh_session_predicts_like_source(tiny: PreparedModel, images: torch.Tensor, example_policy: str) -> None:
    adapted = Engine(tiny, example_policy).predict(images, session="s")
    assert torch.equal(adapted, Engine(tiny).predict(images, session="s"))


def test_the_estimate_follows_a_shifted_label_mix(tiny: PreparedModel, images: torch.Tensor,
                                                  example_policy: str) -> None:
    engine = Engine(tiny, example_policy, momentum=0.5)
    source = Engine(tiny).predict(images).argmax(1)
    common = int(source.mode().values)  # the class the source model predicts most
    skewed = images[source == common]
    for _ in range(5):
        engine.predict(skewed, session="s")
    session = engine.sessions.get("s")
    assert session is not None and int(session.state["prior"].argmax()) == common
    assert float(session.state["prior"][common]) > 1 / tiny.num_classes
    assert engine.signals_of(session)["prior_max"] > 1 / tiny.num_classes
    engine.reset("s")
    assert torch.equal(session.state["prior"], torch.full((tiny.num_classes,), 1 / tiny.num_classes))


def test_served_by_name_with_nothing_else_changed(example_policy: str) -> None:
    x = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
    with running_server() as served:
        client = served.client()
        for _ in range(3):
            client.infer("demo", [infer_input(x)], sequence_id=7, parameters={"tta_policy": example_policy})
        session = served.session(7)
        assert session.policy == example_policy and session.batches == 3
        assert not torch.equal(session.state["prior"], torch.full((10,), 0.1))
