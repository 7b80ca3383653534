"""Bearer-token authentication with two scopes, as a grpc.aio server interceptor.

``inference`` tokens may call the inference API; ``admin`` tokens may call everything,
including the control plane (``ttaserve.v1.AdaptationService``). Health checks and
``ServerLive`` stay open for probes. Tokens are compared in constant time."""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

OPEN_METHODS = frozenset({"/inference.GRPCInferenceService/ServerLive"})
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
ADMIN_PREFIXES = ("/ttaserve.v1.",)


@dataclass(frozen=True)
class Tokens:
    inference: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.inference or self.admin)

    @classmethod
    def load(cls, path: str | None = None, environ: dict[str, str] | None = None) -> Tokens:
        """From a file of ``<scope> <token>`` lines (``#`` comments) and/or the
        comma-separated ``TTASERVE_INFERENCE_TOKENS`` / ``TTASERVE_ADMIN_TOKENS``."""
        env = os.environ if environ is None else environ
        scopes: dict[str, list[str]] = {
            "inference": _split(env.get("TTASERVE_INFERENCE_TOKENS", "")),
            "admin": _split(env.get("TTASERVE_ADMIN_TOKENS", "")),
        }
        if path:
            for number, line in enumerate(Path(path).read_text().splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                scope, _, token = line.partition(" ")
                if scope not in scopes or not token.strip():
                    raise ValueError(f"{path}:{number}: expected '<inference|admin> <token>'")
                scopes[scope].append(token.strip())
        return cls(tuple(t.encode() for t in scopes["inference"]),
                   tuple(t.encode() for t in scopes["admin"]))

    def scope_of(self, token: bytes) -> str | None:
        # Compare against every token so the time taken does not reveal which one matched.
        admin = any([hmac.compare_digest(token, t) for t in self.admin])
        inference = any([hmac.compare_digest(token, t) for t in self.inference])
        return "admin" if admin else "inference" if inference else None


def _split(raw: str) -> list[str]:
    return [t.strip() for t in raw.split(",") if t.strip()]


def required_scope(method: str) -> str | None:
    if method in OPEN_METHODS or method.startswith(OPEN_PREFIXES):
        return None
    return "admin" if method.startswith(ADMIN_PREFIXES) else "inference"


def check(tokens: Tokens, method: str, metadata: Iterable[tuple[str, Any]]) -> tuple[grpc.StatusCode, str] | None:
    """None if the call may proceed, else the (code, message) to refuse it with."""
    needed = required_scope(method)
    if needed is None:
        return None
    header = next((str(v) for k, v in metadata if k == "authorization"), "")
    if not header.startswith("Bearer "):
        return grpc.StatusCode.UNAUTHENTICATED, "missing credentials: send metadata 'authorization: Bearer <token>'"
    scope = tokens.scope_of(header[len("Bearer "):].strip().encode())
    if scope is None:
        return grpc.StatusCode.UNAUTHENTICATED, "invalid token"
    if needed == "admin" and scope != "admin":
        return grpc.StatusCode.PERMISSION_DENIED, f"{method} needs an admin token"
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(details)
        refusal = check(self.tokens, details.method, details.invocation_metadata or ())
        if refusal is None or handler is None:
            return handler
        return _refusing(handler, *refusal)


def _refusing(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover  (makes this an async generator)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    behaviour = streaming if handler.response_streaming else unary
    return make(behaviour, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
