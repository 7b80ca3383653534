"""Domain errors. They carry no transport codes; server/errors.py maps them to gRPC."""

from __future__ import annotations


class TTAServeError(Exception):
    """Base of every error ttaserve reports to a client."""


class InvalidInput(TTAServeError):
    """The request is malformed; the message says what to fix."""


class NotFound(TTAServeError):
    """Unknown model, version or session."""


class Overloaded(TTAServeError):
    """A configured cap (queue, sessions, message size) was reached; the message names it."""


class DeadlineExceeded(TTAServeError):
    """The request's deadline passed before it could run; it was not run."""


class Unavailable(TTAServeError):
    """The server is draining or the model is not ready."""


class Unauthenticated(TTAServeError):
    """No or unknown credentials."""


class PermissionDenied(TTAServeError):
    """Valid credentials without the scope the call needs."""


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` for an error message, cut to about ``limit`` characters: messages
    echo client input, which must not make them unboundedly long."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"
