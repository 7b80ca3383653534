"""The command line's conventions: shared flags before or after the subcommand on every
leaf command, one KEY=VALUE parser, the local policy list, and clear messages when an
optional extra is missing. (Commands against a running server: tests/server/test_control.py.)"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ttaserve.cli import build_parser, main
from ttaserve.cli_args import fill_defaults, param


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield path, parser
    for group in groups:
        for name, child in group.choices.items():
            yield from _leaves(child, (*path, name))


LEAVES = dict(_leaves(build_parser()))
REMOTE = [path for path in LEAVES if path[0] in ("policy", "sessions")]


def _required(path: tuple[str, ...]) -> list[str]:
    """Placeholder values for a leaf's positional arguments and required options."""
    positionals = [a for a in LEAVES[path]._actions if not a.option_strings and a.required]
    options = [[a.option_strings[0], "x"] for a in LEAVES[path]._actions if a.option_strings and a.required]
    return [a.choices[0] if a.choices else "x" for a in positionals] + sum(options, [])  # type: ignore[index]


def _parse(argv: list[str]) -> argparse.Namespace:
    return fill_defaults(build_parser().parse_args(argv))


def test_the_command_tree_is_what_the_docs_describe() -> None:
    assert {" ".join(p) for p in LEAVES} == {
        "serve", "ray-serve", "train-demo", "prepare", "policies", "bench accuracy", "bench perf",
        "export-onnx", "package-mar",
        "policy list", "policy get", "policy set",
        "sessions list", "sessions show", "sessions reset", "sessions snapshot", "sessions restore"}


@pytest.mark.parametrize("path", list(LEAVES), ids=" ".join)
def test_log_level_goes_before_or_after_every_leaf_command(path: tuple[str, ...]) -> None:
    rest = _required(path)
    assert _parse([*path, *rest]).log_level == "INFO"
    assert _parse([*path, *rest, "--log-level", "debug"]).log_level == "DEBUG"
    assert _parse(["--log-level", "WARNING", *path, *rest]).log_level == "WARNING"


@pytest.mark.parametrize("path", REMOTE, ids=" ".join)
def test_server_flags_go_before_or_after_every_remote_command(path: tuple[str, ...]) -> None:
    flags = ["--url", "10.0.0.1:9", "--token", "t", "--json"]
    group, leaf = path
    for argv in ([group, leaf, *_required(path), *flags], [group, *flags, leaf, *_required(path)]):
        args = _parse(argv)
        assert (args.url, args.token, args.json) == ("10.0.0.1:9", "t", True), argv
    plain = _parse([group, leaf, *_required(path)])
    assert (plain.url, plain.token, plain.json) == (None, None, False)


def test_a_flag_after_the_subcommand_wins_over_one_before() -> None:
    assert _parse(["policy", "--url", "a:1", "list", "--url", "b:2"]).url == "b:2"


def test_an_unknown_log_level_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["policies", "--log-level", "LOUD"])
    assert exit_.value.code == 2 and "invalid choice: 'LOUD'" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "expected"), [
    ("alpha=0.2", ("alpha", 0.2)), ("K=16", ("K", 16)), ("rescale=true", ("rescale", True)),
    ("meta_bn_stats=batch", ("meta_bn_stats", "batch")), (" lr = 1e-3 ", ("lr", 0.001)),
    ('name="x y"', ("name", "x y")), ("empty=", ("empty", "")),
])
def test_key_value_parser(text: str, expected: tuple[str, object]) -> None:
    assert param(text) == expected


@pytest.mark.parametrize("bad", ["alpha", "=1", ""])
def test_key_value_parser_names_the_expected_form(bad: str) -> None:
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        param(bad)


def test_serve_and_policy_set_reject_a_param_without_equals(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["serve", "--param", "alpha"], ["policy", "set", "demo", "tent", "--param", "lr"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "expected KEY=VALUE" in capsys.readouterr().err


def test_local_policy_list_needs_no_server(capsys: pytest.CaptureFixture[str]) -> None:
    from ttaserve.adapters import policy_names

    assert main(["policy", "list", "--local", "--url", "127.0.0.1:1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["POLICY", "PARAMETERS", "DESCRIPTION"]
    assert [line.split()[0] for line in lines[1:]] == policy_names()
    assert main(["policy", "list", "--local", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["policies"]
    alpha = next(p for p in listed if p["name"] == "alpha-bn")["parameters"]
    assert alpha == [{"name": "alpha", "type": "float", "default_json": "0.1", "min_json": "0.0", "max_json": "1.0"}]


def test_policies_is_an_alias_that_says_where_it_went(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "list", "--local", "--json"]) == 0
    expected = capsys.readouterr().out
    assert main(["policies", "--json"]) == 0
    out, err = capsys.readouterr()
    assert out == expected and "'ttaserve policy list --local'" in err


def _hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``import <module>`` fail as if the package were not installed."""
    for name in list(sys.modules):
        if name in modules or name.startswith(tuple(m + "." for m in modules)):
            monkeypatch.setitem(sys.modules, name, None)  # type: ignore[arg-type]
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # type: ignore[arg-type]


def test_accuracy_without_matplotlib_writes_json_and_table_and_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    from ttaserve.bench.accuracy import Config, parse_row, run

    config = Config(n=8, n_small=8, n_continual=8, rounds=1, corruptions=("contrast",), streams=("iid",),
                    batch_sizes=(8,), rows=(parse_row("source"),))
    (tmp_path / "run.json").write_text(json.dumps(run(config)))
    _hide(monkeypatch, "matplotlib")
    with caplog.at_level(logging.WARNING):
        assert main(["bench", "accuracy", "--merge", str(tmp_path / "run.json"), "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "accuracy.json").read_text())["cells"]
    assert "| source |" in (tmp_path / "out" / "accuracy.md").read_text()
    assert not (tmp_path / "out" / "accuracy.png").exists()
    assert "pip install 'ttaserve[bench]'" in caplog.text and "accuracy.png was not drawn" in caplog.text
    assert "accuracy.png" not in capsys.readouterr().out  # only written files are listed


def test_a_missing_extra_is_named_with_its_install_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    _hide(monkeypatch, "tritonclient")
    argv = ["bench", "accuracy", "--via-grpc", "--n", "8", "--n-small", "8", "--n-continual", "8",
            "--corruptions", "contrast", "--streams", "iid", "--batch-sizes", "8", "--policies", "source",
            "--no-progress", "--out", str(tmp_path)]
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    assert "needs 'tritonclient'" in caplog.text and "pip install 'ttaserve[client]'" in caplog.text
