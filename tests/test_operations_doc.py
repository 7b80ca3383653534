"""docs/OPERATIONS.md's options table is the whole truth about ``ttaserve serve``: every flag
of ``serve --help`` is in it, nothing else is, and every environment variable it names is
one the server reads."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

from ttaserve.cli import build_parser
from ttaserve.server.settings import ServerSettings

DOC = Path(__file__).resolve().parents[1] / "docs" / "OPERATIONS.md"
TOKEN_VARIABLES = {"TTASERVE_INFERENCE_TOKENS", "TTASERVE_ADMIN_TOKENS"}  # read by server/auth.py


def _options_section() -> str:
    text = DOC.read_text()
    start = text.index("## Server options")
    return text[start:text.index("\n## ", start + 1)]


def _table_rows() -> list[list[str]]:
    rows = [line.split("|")[1:-1] for line in _options_section().splitlines() if line.startswith("| `")]
    assert rows, "no options table found"
    return rows


def _serve_flags() -> set[str]:
    serve = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    return {s for action in serve._actions for s in action.option_strings if s.startswith("--")} - {"--help"}


def test_every_serve_flag_is_in_the_options_table_and_only_those() -> None:
    documented = {flag for row in _table_rows() for flag in re.findall(r"--[a-z0-9-]+", row[0])}
    assert documented == _serve_flags()


def test_every_environment_variable_named_is_one_the_server_reads() -> None:
    settings = {f"TTASERVE_{f.name.upper()}" for f in dataclasses.fields(ServerSettings)}
    named = set(re.findall(r"TTASERVE_[A-Z_]+", _options_section()))
    assert named - settings - TOKEN_VARIABLES == set()
    assert settings - named == {"TTASERVE_POLICY_PARAMS", "TTASERVE_SAFETY_PARAMS"}  # --param, --safety have none
