"""Every example in the documentation runs, so none can go stale.

Each fenced ``bash`` and ``python`` block of README.md and docs/*.md is one test, run in
document order from an empty scratch folder (``ttaserve`` is this checkout's CLI;
``./scripts/`` are this checkout's scripts). An HTML comment on the line before a block
says how to run it; without one the block runs as written and must exit 0:

- ``<!-- doc-test: server -->``: against a real ``ttaserve serve`` (demo model) that the test
  starts once for all such blocks; the documented addresses ``127.0.0.1:8001`` and ``:8002``
  become its real ones, and ``TTASERVE_URL`` points at it.
- ``<!-- doc-test: background -->``: the command starts a server (on free ports through
  ``TTASERVE_GRPC_PORT=0``/``TTASERVE_METRICS_PORT=0``); it must report ready, then is
  stopped with SIGTERM and must exit 0.
- ``<!-- doc-test: parse -->``: too long to run here; every ``ttaserve`` line is parsed by
  the real argument parser (unknown flags or values fail).
- ``<!-- doc-test: slow -->``: parsed in the default suite and run as written in the slow
  one (``scripts/test-slow.sh tests/test_docs.py``; CI runs it).
- ``<!-- doc-test: sandbox -->``: may change the checkout (e.g. add a policy file), so it
  runs in a scratch copy of the tracked files.
- ``<!-- doc-test: append ARGS -->``: each command runs with ARGS appended (the test
  command itself, limited to a collection run).
- ``<!-- doc-test: excerpt FILE -->``: a quotation of FILE; it must appear there verbatim.

JSON blocks (configuration examples) are data, not commands, and are not run.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.server.conftest import start_process
from ttaserve.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKER = re.compile(r"<!--\s*doc-test:\s*(\w+)\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(bash|python)\s*$")
TIMEOUT_S = 900  # a --quick benchmark on a busy 2-core machine


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    mode: str  # "" (run as written), server, background, parse, sandbox, append
    argument: str
    text: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(path: Path) -> Iterator[Block]:
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.search(before)
        yield Block(path, i + 1, match.group(1), marker.group(1) if marker else "",
                    marker.group(2) if marker else "", "\n".join(lines[i + 1:end]) + "\n")
        i = end + 1


BLOCKS = [b for doc in DOCS for b in blocks(doc)]


def commands(text: str) -> list[list[str]]:
    """The command lines of a bash block as argv lists (continuations joined, comments
    dropped)."""
    joined = re.sub(r"\\\n", " ", text)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, str]]:
    proc, grpc_url, metrics_url = start_process()
    try:
        yield grpc_url, urlsplit(metrics_url).netloc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``ttaserve`` that is ``python -m ttaserve`` of this interpreter (in a sandbox, the
    sandbox's copy: ``-m`` imports from the working directory first)."""
    folder = tmp_path_factory.mktemp("bin")
    script = folder / "ttaserve"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ttaserve "$@"\n')
    script.chmod(0o755)
    return folder


def _environment(bin_dir: Path) -> dict[str, str]:
    """This environment without TTASERVE_* settings (the data folder excepted), with this
    checkout's ``ttaserve`` and interpreter first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTASERVE_") or k == "TTASERVE_DATA"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def _script(block: Block) -> str:
    text = block.text.replace("./scripts/", f"{REPO}/scripts/")
    if block.mode == "append":
        text = "\n".join(f"{shlex.join(argv)} {block.argument}" for argv in commands(text)) + "\n"
    return text


def _run(block: Block, cwd: Path, env: dict[str, str]) -> None:
    if block.language == "python":
        command = [sys.executable, "-c", block.text]
    else:
        command = ["bash", "-euo", "pipefail", "-c", _script(block)]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"{block.name} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"


def _background(block: Block, cwd: Path, env: dict[str, str]) -> None:
    env = {**env, "TTASERVE_GRPC_PORT": "0", "TTASERVE_METRICS_PORT": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(["bash", "-c", _script(block)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            seen.append(line)
            if line.startswith("ttaserve ready"):
                break
        assert seen and seen[-1].startswith("ttaserve ready"), "".join(seen)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(120)
    assert code == 0, f"{block.name} exited {code} on SIGTERM:\n{''.join(seen)}"


def _parse(block: Block) -> None:
    parser = build_parser()
    lines = commands(block.text)
    assert lines, f"{block.name}: nothing to parse"
    for argv in lines:
        assert argv[0] == "ttaserve", f"{block.name}: only ttaserve commands can be parse-checked: {argv}"
        parser.parse_args(argv[1:])  # SystemExit (exit code 2) on any unknown flag or value


def _sandbox(tmp_path: Path) -> Path:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    copy = tmp_path / "checkout"
    for name in tracked.stdout.splitlines():
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    return copy


def test_every_block_has_a_known_mode() -> None:
    assert BLOCKS, "no examples found"
    modes = ("", "server", "background", "parse", "sandbox", "append", "excerpt", "slow")
    unknown = [b.name for b in BLOCKS if b.mode not in modes]
    assert unknown == []


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.mode == "slow"], ids=lambda b: b.name)
def test_slow_example_runs(block: Block, bin_dir: Path, tmp_path: Path) -> None:
    _run(block, tmp_path, _environment(bin_dir))


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.name)
def test_example_runs(block: Block, request: pytest.FixtureRequest, bin_dir: Path, tmp_path: Path) -> None:
    env = _environment(bin_dir)
    if block.mode in ("parse", "slow"):
        _parse(block)
    elif block.mode == "excerpt":
        assert block.text in (REPO / block.argument).read_text(), f"{block.name} is not in {block.argument}"
    elif block.mode == "background":
        _background(block, tmp_path, env)
    elif block.mode == "server":
        grpc_url, metrics = request.getfixturevalue("server")
        env["TTASERVE_URL"] = grpc_url
        text = block.text.replace("127.0.0.1:8001", grpc_url).replace("127.0.0.1:8002", metrics)
        _run(Block(block.path, block.line, block.language, block.mode, block.argument, text), tmp_path, env)
    elif block.mode == "sandbox":
        _run(block, _sandbox(tmp_path), env)
    else:
        _run(block, tmp_path, env)


def test_the_readme_stays_a_front_door() -> None:
    """Under 25 KB, with a table of contents that links every page in docs/."""
    text = (REPO / "README.md").read_text()
    assert len(text.encode()) < 25_000
    contents = text[text.index("## Contents"):text.index("\n## ", text.index("## Contents") + 1)]
    assert {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")} <= set(re.findall(r"\((docs/\w+\.md)\)", contents))
