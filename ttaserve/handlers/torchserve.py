"""TorchServe custom handler: ttaserve's Engine inside a TorchServe worker.

A model archive built by ``ttaserve package-mar`` names this module's :func:`handle` as its
entry point. The worker then serves the model exactly as ``ttaserve serve`` would, with
one adaptation session per TorchServe sequence (its stateful-inference API:
``sequenceBatching: true`` in the archive's model-config.yaml):

* the session key is TorchServe's sequence id (``context.get_sequence_id``; clients send
  it in the ``ts_request_sequence_id`` header, or TorchServe assigns one to a request
  without it and marks that request ``ts_request_sequence_start``);
* ``ts_request_sequence_start: true`` starts the session afresh, ``ts_request_sequence_end:
  true`` releases it after the request;
* ``tta_policy`` (string) and ``tta_adapt`` (true/false) are read from request headers or
  from the JSON body, with the same meaning as the gRPC request parameters.

Request body: ``.npy`` bytes of the input batch ([B, ...], the model's dtype), or JSON
``{"data": nested list [B, ...], "tta_policy": ..., "tta_adapt": ...}``. Response: JSON
``{"logits": [[...]], "predictions": [...], "policy": ..., "sequence_id": ...}``. A bad
request gets HTTP 400 (501 for a policy the model cannot run) with
``{"error": message, "code": ...}`` and changes no state. Requests of several sequences
that TorchServe batches together go through ttaserve's cross-session batching, so each
gets what it would get alone.

Sessions live in the worker's memory: run one worker per model (the archive's default) or
rely on TorchServe keeping a sequence on its worker while it is active.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ttaserve.adapters import ModelError, PolicyError, Unsupported
from ttaserve.batching import Prediction, Request
from ttaserve.engine import Engine
from ttaserve.errors import InvalidInput, NotFound, Overloaded
from ttaserve.handlers.spec import DTYPES, ModelSpec
from ttaserve.sessions import SessionLimits

log = logging.getLogger(__name__)

CONFIG = "ttaserve.json"  # written into the archive by package-mar
SEQUENCE_ID, SEQUENCE_START, SEQUENCE_END = ("ts_request_sequence_id", "ts_request_sequence_start",
                                             "ts_request_sequence_end")
_STATUS: tuple[tuple[type[Exception], int, str], ...] = (
    (Unsupported, 501, "UNIMPLEMENTED"), (InvalidInput, 400, "INVALID_ARGUMENT"),
    (PolicyError, 400, "INVALID_ARGUMENT"), (ModelError, 400, "INVALID_ARGUMENT"),
    (NotFound, 404, "NOT_FOUND"), (Overloaded, 429, "RESOURCE_EXHAUSTED"),
)


@dataclass
class Decoded:
    x: torch.Tensor
    session: str | None
    policy: str | None
    adapt: bool
    start: bool
    end: bool


class TorchServeHandler:
    """One served model: its spec and engine, built from the archive's ttaserve.json."""

    def __init__(self, model_dir: Path) -> None:
        from ttaserve.handlers.loader import demo_model, load_model_dir

        config = json.loads((model_dir / CONFIG).read_text())
        loaded = demo_model() if config.get("model") is None else load_model_dir(model_dir / config["model"])
        if config.get("threads"):
            torch.set_num_threads(int(config["threads"]))
        self.spec: ModelSpec = loaded.spec
        self.max_batch = int(config.get("max_batch", 256))
        policy = config.get("policy") or loaded.policy or "source"
        params = config.get("params") or (loaded.params if loaded.policy == policy else {})
        limits = SessionLimits(idle_timeout_s=float(config.get("session_idle_s", 600)))
        self.engine = Engine(loaded.model, policy, limits=limits, **params)
        log.info("ttaserve handler: model %s, default policy %s", self.spec.name, self.engine.default.name)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[dict[str, Any]]:
        self.engine.sessions.expire_idle()
        decoded: list[Decoded | Exception] = []
        for idx, row in enumerate(data):
            try:
                decoded.append(self.decode(row, _headers(context, idx), _sequence_id(context, idx)))
            except Exception as exc:  # noqa: BLE001 - reported to that request only
                decoded.append(exc)
        good = [d for d in decoded if isinstance(d, Decoded)]
        results = iter(self.engine.predict_many([Request(d.x, d.session, d.adapt, d.policy, d.start, d.end)
                                                  for d in good]))
        responses = []
        for idx, item in enumerate(decoded):
            result = next(results) if isinstance(item, Decoded) else item
            if isinstance(result, Exception):
                responses.append(_error(context, idx, result))
            else:
                assert isinstance(item, Decoded)
                responses.append(self._response(item, result))
        return responses

    def decode(self, row: dict[str, Any], headers: dict[str, str], sequence_id: str | None) -> Decoded:
        """A validated request; raises InvalidInput with what to fix."""
        body = row.get("data", row.get("body"))
        fields: dict[str, Any] = {}
        if isinstance(body, (bytes, bytearray)) and bytes(body[:6]) == b"\x93NUMPY":
            array = np.load(io.BytesIO(bytes(body)), allow_pickle=False)
        else:
            fields = body if isinstance(body, dict) else _json(body)
            if "data" not in fields:
                raise InvalidInput('send the input batch as .npy bytes or as JSON {"data": [[...]]}')
            array = np.asarray(fields["data"])
        tensor = self.spec.inputs[0]
        array = _checked(array.astype(DTYPES[tensor.datatype], copy=False), tensor, self.max_batch)
        policy = fields.get("tta_policy", headers.get("tta_policy")) or None
        return Decoded(torch.from_numpy(np.ascontiguousarray(array)), sequence_id or None, policy,
                       _flag(fields.get("tta_adapt", headers.get("tta_adapt", True)), "tta_adapt"),
                       _flag(headers.get(SEQUENCE_START, False), SEQUENCE_START),
                       _flag(headers.get(SEQUENCE_END, False), SEQUENCE_END))

    def _response(self, request: Decoded, answer: Prediction) -> dict[str, Any]:
        logits = answer.logits
        return {"logits": logits.detach().numpy().tolist(), "predictions": logits.argmax(1).tolist(),
                "policy": answer.policy, "sequence_id": request.session}


def _json(body: Any) -> dict[str, Any]:
    try:
        value = json.loads(body.decode() if isinstance(body, (bytes, bytearray)) else body)
    except (TypeError, ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"request body is neither .npy bytes nor JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidInput('the JSON body must be an object: {"data": [[...]], "tta_policy": ...}')
    return value


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise InvalidInput(f"{name} must be true or false, got {value!r}")
    return text in ("true", "1")


def _checked(array: np.ndarray, spec: Any, max_batch: int) -> np.ndarray:
    expected = spec.shape
    fits = array.ndim == len(expected) and all(e == -1 or s == e for s, e in zip(array.shape[1:], expected[1:]))
    if not fits or not 1 <= array.shape[0] <= max_batch:
        raise InvalidInput(f"input has shape {list(array.shape)}, expected {list(expected)} with a batch of "
                           f"1..{max_batch}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput("input contains NaN or Inf; send finite values")
    if spec.value_range is not None and (array.min() < spec.value_range[0] or array.max() > spec.value_range[1]):
        raise InvalidInput(f"input values lie outside the model's range {list(spec.value_range)}")
    return array


def _headers(context: Any, idx: int) -> dict[str, str]:
    """The request's headers, names lower-cased (HTTP header names are case-insensitive)."""
    try:
        raw = context.get_all_request_header(idx) or {}
    except (AttributeError, IndexError):
        return {}
    return {str(k).lower(): v.decode() if isinstance(v, bytes) else str(v) for k, v in raw.items()}


def _sequence_id(context: Any, idx: int) -> str | None:
    getter = getattr(context, "get_sequence_id", None)
    value = getter(idx) if getter is not None else _headers(context, idx).get(SEQUENCE_ID)
    return value or None


def _error(context: Any, idx: int, exc: Exception) -> dict[str, Any]:
    status, code = next(((s, c) for kind, s, c in _STATUS if isinstance(exc, kind)), (500, "INTERNAL"))
    if status == 500:
        log.exception("internal error", exc_info=exc)
    context.set_response_status(status, str(exc)[:200], idx)
    return {"error": str(exc), "code": code}


_SERVICE: TorchServeHandler | None = None


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[dict[str, Any]] | None:
    """TorchServe's entry point: ``data`` is None once, when the worker loads the model."""
    global _SERVICE
    if data is None or _SERVICE is None:
        _SERVICE = TorchServeHandler(Path(context.system_properties["model_dir"]))
        if data is None:
            return None
    return _SERVICE.handle(data, context)
