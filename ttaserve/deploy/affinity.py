"""Which session a proxied request belongs to (no Ray import: unit-testable on its own)."""

from __future__ import annotations

from typing import Any

from ttaserve.deploy.hashring import session_key

_ID_KINDS = ("int64_param", "uint64_param", "string_param")


def request_session_key(request: Any) -> str | None:
    """The routing key of a ``ModelInferRequest``: ``(model, sequence_id)``, or None for a
    request without a sequence (or one whose id the replica will reject anyway: it may go
    anywhere, the replica answers INVALID_ARGUMENT)."""
    params = getattr(request, "parameters", None)
    model = getattr(request, "model_name", None)
    if params is None or not isinstance(model, str) or "sequence_id" not in params:
        return None
    param = params["sequence_id"]
    kind = param.WhichOneof("parameter_choice")
    if kind not in _ID_KINDS:
        return None
    value = getattr(param, kind)
    if not value:  # 0 and "" mean "no sequence"
        return None
    return session_key(model, int(value) if kind != "string_param" else str(value))
