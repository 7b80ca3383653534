"""`ttaserve prepare` builds artifacts for a user's model, which then serves every policy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tests.conftest import make_tiny
from ttaserve import Engine
from ttaserve.cli import main as cli
from ttaserve.handlers.loader import load_model_dir


def test_prepare_artifacts_for_a_user_model(tmp_path: Path) -> None:
    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    torch.save(make_tiny().state_dict(), model_dir / "weights.pt")
    config = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 12, 12]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}],
        "factory": "tests.conftest:TinyNet", "weights": "weights.pt",
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "source.npz", x=rng.random((48, 1, 12, 12), dtype=np.float32), y=rng.integers(0, 3, 48))
    for artifact in ("adanpc", "ecotta"):
        out = model_dir / f"{artifact}.safetensors"
        extra = ["--per-class", "0"] if artifact == "adanpc" else ["--steps", "3", "--partitions", "1"]
        assert cli(["prepare", artifact, "--model-dir", str(model_dir), "--source-npz",
                    str(tmp_path / "source.npz"), "--out", str(out), *extra]) == 0
        assert out.exists()
    config["artifacts"] = {"adanpc.memory": "adanpc.safetensors", "ecotta.meta": "ecotta.safetensors"}
    (model_dir / "config.json").write_text(json.dumps(config))
    loaded = load_model_dir(model_dir)
    x = torch.rand(4, 1, 12, 12)
    for policy in ("adanpc", "ecotta"):
        out = Engine(loaded.model, policy).predict(x, session="s")
        assert out.shape == (4, 3) and torch.isfinite(out).all()


def test_the_shipped_demo_memory_is_what_prepare_builds() -> None:
    """``ttaserve prepare adanpc`` is the one builder of the shipped demo memory: a smaller
    per-class subset picks a subset of the shipped entries (the per-class permutations do
    not depend on the subset size), with the same labels and features up to float16
    rounding of a different thread count."""
    from safetensors.torch import load_file

    from ttaserve.data import load_split
    from ttaserve.models import demo, weights_path
    from ttaserve.prepare import ADANPC_PER_CLASS, adanpc_memory, balanced_indices

    x, y = load_split("train")
    small = adanpc_memory(demo(), x, y, per_class=20)
    shipped = load_file(weights_path("adanpc_memory"))
    rows = torch.searchsorted(balanced_indices(y, ADANPC_PER_CLASS), balanced_indices(y, 20))
    assert shipped["labels"].numel() == 10 * ADANPC_PER_CLASS and small["labels"].numel() == 200
    assert torch.equal(shipped["labels"][rows], small["labels"])
    torch.testing.assert_close(shipped["features"][rows].float(), small["features"].float(), atol=2e-3, rtol=0)
