"""``ttaserve bench accuracy``: rows, grid, numbers, outputs, reruns and the gRPC path."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from ttaserve.adapters import policy_names, prepare
from ttaserve.bench.accuracy import (
    Config,
    Row,
    default_rows,
    parse_row,
    quick_config,
    run,
    total_samples,
)
from ttaserve.bench.accuracy_report import check_goals, write
from ttaserve.bench.corruptions import corrupt
from ttaserve.bench.streams import generator
from ttaserve.cli import main
from ttaserve.data import load_split
from ttaserve.models import demo

# A few seconds: two corruptions and clean images, 48 images, every stream kind, batch 16 and 1.
TINY = Config(n=48, n_small=8, n_continual=16, rounds=2, corruptions=("gaussian_noise", "contrast"),
              streams=("iid", "dirichlet(0.01)", "sorted", "continual", "mixed"), batch_sizes=(16, 1),
              rows=tuple(parse_row(r) for r in ("source", "tbn", "tent", "generalist", "graded-bn")))
ROWS = ["source", "tbn", "tent", "generalist", "graded-bn"]


@pytest.fixture(scope="module")
def tiny_result() -> dict[str, Any]:
    return run(TINY)


def numbers(result: dict[str, Any]) -> list[Any]:
    """Every error of a result (resets are only known in-process)."""
    return [{k: v for k, v in row.items() if k not in ("path", "resets")}
            for cell in result["cells"] for row in cell["rows"].values()]


def test_parse_row() -> None:
    assert parse_row("tent") == Row("tent", "tent")
    assert parse_row("alpha-bn(alpha=0.2)") == Row("alpha-bn(alpha=0.2)", "alpha-bn", (("alpha", 0.2),))
    assert parse_row("t3(rescale=true,lambda_min=0)").params == (("rescale", True), ("lambda_min", 0))
    assert parse_row("generalist") == Row("generalist", "source", model="generalist")
    assert not parse_row("tent-noguard").guard and not parse_row("tent-noguard").servable
    assert not parse_row("graded-bn-nosafety").safety and not parse_row("graded-bn-nosafety").servable
    assert parse_row("tbn+adanpc(adanpc.k=5)") == Row("tbn+adanpc(adanpc.k=5)", "tbn+adanpc", (("adanpc.k", 5),))
    for bad in ("nope", "tent(lr=1", "", "adanpc+alpha+bn"):
        with pytest.raises(ValueError):
            parse_row(bad)


def test_default_rows_cover_every_registered_policy_plus_the_extras() -> None:
    labels = [r.label for r in default_rows()]
    extras = {"generalist", "tent-noguard", "graded-bn-nosafety", "graded-bn+adanpc", "alpha-bn+adanpc"}
    assert set(policy_names()) | extras == set(labels)
    assert labels[0] == "source" and len(labels) == len(set(labels))


def test_grid_runs_one_session_streams_only_at_the_largest_batch() -> None:
    cells = [(s.name, b) for s, b in TINY.cells()]
    assert cells == [("iid", 16), ("dirichlet(0.01)", 16), ("sorted", 16), ("continual", 16), ("mixed", 16),
                     ("iid", 1), ("dirichlet(0.01)", 1), ("sorted", 1)]
    assert len(replace(TINY, full_grid=True).cells()) == 10
    # per row: 16-batch per-domain cells 48 x 3 domains (2 corruptions + clean) x 3 streams,
    # mixed 48 x 2, continual 16 x 2 x 2 rounds; batch 1: 8 x 3 x 3
    assert total_samples(TINY) == 5 * (432 + 96 + 64 + 72)


def test_result_has_every_cell_row_and_corruption(tiny_result: dict[str, Any]) -> None:
    assert len(tiny_result["cells"]) == 8
    for cell in tiny_result["cells"]:
        assert list(cell["rows"]) == ROWS
        for values in cell["rows"].values():
            assert set(values["per_corruption"]) == {"gaussian_noise", "contrast"}
            assert 0 <= values["mean_error"] <= 100
            assert values["unseen_error"] is None  # both corruptions were seen by the generalist
            if cell["stream"] in ("continual", "mixed"):
                assert values["clean_error"] is None
            else:
                assert 0 <= values["clean_error"] <= 100
    continual = next(c for c in tiny_result["cells"] if c["stream"] == "continual")
    assert len(continual["rows"]["tent"]["per_round"]) == 2
    assert len(continual["rows"]["tent"]["curve"]) == 4
    assert continual["samples_per_session"] == [2 * 2 * 16]
    env = tiny_result["environment"]
    assert env["torch_threads"] == 1 and env["weights_sha256"]["expert"]


def test_source_error_equals_the_model_evaluated_directly(tiny_result: dict[str, Any]) -> None:
    """Source predictions do not depend on the batch or the order, so any stream's error is
    the plain error of the model on the same corrupted images."""
    x, y = load_split("test")
    chosen = torch.randperm(len(y), generator=generator(0, "subset", "test"))[:48]
    model = prepare(demo())
    for i, name in enumerate(TINY.corruptions):
        images = corrupt(x[chosen], name, 5, seed=i)
        with torch.no_grad():
            wrong = (model(images).argmax(1) != y[chosen]).double().mean().item() * 100
        for cell in tiny_result["cells"]:
            if cell["images_per_corruption"] == 48:  # iid, dirichlet and mixed at batch 16
                assert cell["rows"]["source"]["per_corruption"][name] == pytest.approx(wrong, abs=1e-3)


def test_label_correlation_hurts_test_batch_normalization(tiny_result: dict[str, Any]) -> None:
    def error(row: str) -> dict[str, float]:
        return {c["stream"]: c["rows"][row]["mean_error"] for c in tiny_result["cells"] if c["batch"] == 16}

    assert error("tbn")["dirichlet(0.01)"] > error("tbn")["iid"]
    assert error("source")["dirichlet(0.01)"] == error("source")["iid"]  # order-independent


def test_same_seed_same_numbers_other_seed_other_numbers(tiny_result: dict[str, Any]) -> None:
    assert numbers(run(TINY)) == numbers(tiny_result)
    assert numbers(run(replace(TINY, seed=1))) != numbers(tiny_result)


def test_outputs_written_and_goals_reported(tiny_result: dict[str, Any], tmp_path: Path) -> None:
    paths = write(tiny_result, tmp_path)
    document = json.loads(paths["json"].read_text())
    assert document["config"]["seed"] == 0 and len(document["goals"]) == len(check_goals(tiny_result))
    assert paths["chart"].read_bytes()[:4] == b"\x89PNG"
    text = paths["table"].read_text()
    assert "| tbn |" in text and "round 2" in text and "clean images" in text
    goals = {g["goal"]: g for g in check_goals(tiny_result)}
    default = [g for name, g in goals.items() if name.startswith("default graded-bn")]
    assert len(default) == 3 and all(g["met"] is not None for g in default)  # judged at batch 16 and 1
    assert all(g["met"] is None for name, g in goals.items() if not name.startswith("default"))


def test_via_grpc_gives_the_same_numbers_as_in_process(tiny_result: dict[str, Any]) -> None:
    config = replace(TINY, n=32, n_continual=16, batch_sizes=(16,), via_grpc=True)
    over_grpc = run(config)
    in_process = run(replace(config, via_grpc=False))
    assert numbers(over_grpc) == numbers(in_process)
    paths = {label: row["path"] for label, row in over_grpc["cells"][0]["rows"].items()}
    assert paths["tent"] == "grpc" and paths["generalist"].startswith("in-process (not servable")


# --quick itself: about 10 s on an idle 2-core machine, 45-100 s while it is shared.
def test_cli_quick_run_writes_table_json_and_chart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "accuracy", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| policy |" in out and "accuracy.json" in out
    document = json.loads((tmp_path / "accuracy.json").read_text())
    assert document["config"]["n"] == quick_config().n
    assert {r["label"] for r in document["config"]["rows"]} == {r.label for r in default_rows()}
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    assert "Goals" in (tmp_path / "accuracy.md").read_text()


def test_cli_small_run_and_merge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The quick setup cut down, split in two runs by rows, then merged."""
    small = ["bench", "accuracy", "--quick", "--no-progress", "--n", "32", "--n-continual", "16",
             "--corruptions", "gaussian_noise,contrast", "--streams", "iid,continual"]
    assert main([*small, "--out", str(tmp_path / "a"), "--policies", "source", "tbn"]) == 0
    assert main([*small, "--out", str(tmp_path / "b"), "--policies", "tent"]) == 0
    assert main(["bench", "accuracy", "--merge", str(tmp_path / "a" / "accuracy.json"),
                 str(tmp_path / "b" / "accuracy.json"), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "accuracy.json").read_text())
    assert [list(c["rows"]) for c in merged["cells"]] == [["source", "tbn", "tent"]] * 2
    assert (tmp_path / "m" / "accuracy.png").exists() and "| tent |" in capsys.readouterr().out


def test_cli_rejects_unknown_names(tmp_path: Path) -> None:
    assert main(["bench", "accuracy", "--quick", "--corruptions", "rain", "--out", str(tmp_path)]) == 2
    assert main(["bench", "accuracy", "--quick", "--streams", "shuffled", "--out", str(tmp_path)]) == 2
    assert main(["bench", "accuracy", "--quick", "--policies", "magic", "--out", str(tmp_path)]) == 2
