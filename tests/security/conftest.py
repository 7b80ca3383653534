"""Shared pieces of the security suite: a server with three principals, tokens, RSS."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tests.server.conftest import Handle, images, infer_input, running_server
from ttaserve.client import ControlClient

TOKENS = "inference alice-token name=alice\ninference bob-token name=bob\nadmin admin-token name=ops\n"
SECRET = "0123456789abcdef" * 4


def write_tokens(directory: Path) -> Path:
    path = directory / "tokens"
    path.write_text(TOKENS)
    return path


def write_secret(directory: Path) -> Path:
    path = directory / "secret"
    path.write_text(SECRET)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Handle]:
    """A server with principals alice and bob (inference) and ops (admin)."""
    root = tmp_path_factory.mktemp("secured")
    with running_server(auth_token_file=str(write_tokens(root)), secret_file=str(write_secret(root)),
                        state_dir=str(root / "state"), policy="alpha-bn") as handle:
        yield handle


def headers(token: str | None) -> dict[str, str] | None:
    return {"authorization": f"Bearer {token}"} if token else None


def infer(handle: Handle, token: str | None, sequence_id: int | str = 0, seed: int = 0, **kwargs: Any) -> np.ndarray:
    result = handle.client().infer("demo", [infer_input(images(8, seed))], sequence_id=sequence_id,
                                   headers=headers(token), **kwargs)
    return result.as_numpy("logits")


def control(handle: Handle, token: str | None) -> ControlClient:
    return ControlClient(handle.url, token)


def code_of(call: Any) -> grpc.StatusCode:
    """The status code a call fails with (OK if it does not)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    except Exception as exc:  # tritonclient wraps errors in InferenceServerException
        status = getattr(exc, "status", lambda: None)()
        return getattr(grpc.StatusCode, str(status).replace("StatusCode.", ""), grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.OK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def slow_repository(directory: Path) -> Path:
    """A model repository with one model, 'slow': the demo model, each forward >= 0.6 s."""
    model = directory / "slow"
    model.mkdir(parents=True, exist_ok=True)
    model.joinpath("config.json").write_text(json.dumps({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28], "range": [0, 1]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
        "factory": "tests.security.models:slow_demo",
    }))
    return directory

