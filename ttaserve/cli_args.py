"""Arguments every ``ttaserve`` command shares, and the one KEY=VALUE parser.

Shared flags work before or after the subcommand, like kubectl's or git's:
``ttaserve policy list --json`` and ``ttaserve policy --json list`` are the same. Every
parser that offers a shared flag gives it ``default=SUPPRESS`` (argparse copies a
subcommand's defaults over what an outer parser already read, so only a flag actually given
may set a value); :func:`fill_defaults` supplies the defaults once, after parsing.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["DEFAULTS", "fill_defaults", "logging_flags", "output_flags", "param", "param_arg",
           "server_flags"]

DEFAULTS: dict[str, Any] = {"log_level": "INFO", "url": None, "token": None, "json": False}


def logging_flags() -> argparse.ArgumentParser:
    """``--log-level``: a parent parser for every command."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--log-level", default=argparse.SUPPRESS, type=str.upper,
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="how much to log (default INFO)")
    return parent


def output_flags() -> argparse.ArgumentParser:
    """``--log-level`` and ``--json``: for commands that print data."""
    parent = argparse.ArgumentParser(add_help=False, parents=[logging_flags()])
    parent.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")
    return parent


def server_flags() -> argparse.ArgumentParser:
    """``--url``, ``--token``, ``--json`` and ``--log-level``: for commands that talk to a
    running server."""
    parent = argparse.ArgumentParser(add_help=False, parents=[output_flags()])
    parent.add_argument("--url", default=argparse.SUPPRESS,
                        help="server address (env TTASERVE_URL, default 127.0.0.1:8001)")
    parent.add_argument("--token", default=argparse.SUPPRESS, help="admin token (env TTASERVE_TOKEN)")
    return parent


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Give every shared flag that was not given its default."""
    for name, value in DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    return args


def param(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (key, value): the value as JSON when it parses (``0.1``, ``3``,
    ``true``, ``"x"``), else the plain string. Spaces around key and value are dropped."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value.strip()


def param_arg(text: str) -> tuple[str, Any]:
    """:func:`param` as an argparse ``type`` (its message reaches the user)."""
    try:
        return param(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
