"""The one place where domain errors become gRPC status codes."""

from __future__ import annotations

import logging

import grpc

from ttaserve.adapters import ModelError, PolicyError, Unsupported
from ttaserve.errors import (
    DeadlineExceeded,
    InvalidInput,
    NotFound,
    Overloaded,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger(__name__)

# gRPC sends the message as trailing metadata (8 KiB by default, counted with the rest):
# a longer one (e.g. echoing a 100 KB model name) would replace the real status with
# "metadata size exceeds hard limit". Messages are cut to this many characters.
MAX_MESSAGE_CHARS = 1000

_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (PolicyError, grpc.StatusCode.INVALID_ARGUMENT),
    (Unsupported, grpc.StatusCode.UNIMPLEMENTED),  # before ModelError, its base
    (ModelError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, message) for an exception; anything unexpected is INTERNAL and logged."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code, bounded(str(exc))
    log.exception("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, bounded(f"internal error: {type(exc).__name__}: {exc}")


def bounded(message: str) -> str:
    """``message`` cut to MAX_MESSAGE_CHARS, saying how much was left out."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[:MAX_MESSAGE_CHARS]}... ({len(message) - MAX_MESSAGE_CHARS} more characters)"


def code_label(code: grpc.StatusCode) -> str:
    """Metric label for a status code ('OK', 'INVALID_ARGUMENT', ...)."""
    return str(code.name)
