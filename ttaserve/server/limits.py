"""The limits every RPC passes first: authentication, a cap on concurrent RPCs and a clear
answer to bytes that are not a protobuf message, all decided **before the request message
is read**.

- Authentication (server/auth.py) is checked on the call's metadata alone. grpc.aio reads
  and parses a unary call's message before it runs the method, so every method is served
  here as a request-*streaming* one that reads its single message only after the checks:
  a refused call costs its headers, not its body (16 unauthenticated 60 MB requests: RSS
  +16 MiB instead of +1.6 GiB, see docs/BENCHMARKS.md "Resource bounds").
- ``--max-concurrent-rpcs``: every call counts while it runs (a stream for its whole life),
  refused ones included; past the cap a call is answered ``RESOURCE_EXHAUSTED`` naming it,
  immediately and unread. Probes (health ``Check``, ``ServerLive``: open to anyone, and
  over in microseconds) count in a pool of their own, ``PROBE_SLOTS``, so they answer when
  clients fill the cap, and a flood of probes cannot take the clients' slots.
- A request that does not parse as the method's message is answered ``INVALID_ARGUMENT``
  (gRPC's default would be ``UNKNOWN``). On a stream the stream is closed with that status:
  a peer that sends unparseable frames cannot be answered message by message.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from ttaserve.server.auth import OPEN_METHODS, Tokens, check

PROBE_SLOTS = 64


class _Garbage:
    """Stands in for a request that failed to parse."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class LimitsInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates, counts RPCs against ``--max-concurrent-rpcs`` and turns unparseable
    requests into INVALID_ARGUMENT, before a request is read (see the module docstring)."""

    def __init__(self, max_concurrent: int = 0, on_reject: Callable[[], None] | None = None,
                 tokens: Tokens | None = None) -> None:
        self.max_concurrent = max_concurrent  # 0: no cap
        self.tokens = tokens or Tokens()
        self.active = 0  # calls in flight, probes excepted; touched only on the event loop
        self.probes = 0  # probes in flight
        self._on_reject = on_reject

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        refusal = check(self.tokens, method, details.invocation_metadata)
        probe = method in OPEN_METHODS
        gate = _Call(self, method.rsplit("/", 1)[-1], refusal, probe)
        deserialize = _tolerant(handler.request_deserializer)
        serialize = handler.response_serializer
        if handler.response_streaming:
            behaviour = handler.unary_stream or handler.stream_stream
            run = gate.streaming(behaviour, handler.request_streaming)
            return grpc.stream_stream_rpc_method_handler(run, deserialize, serialize)
        behaviour = handler.unary_unary or handler.stream_unary
        return grpc.stream_unary_rpc_method_handler(
            gate.unary(behaviour, handler.request_streaming), deserialize, serialize)

    @contextlib.asynccontextmanager
    async def slot(self, context: grpc.aio.ServicerContext, probe: bool,
                   refusal: tuple[grpc.StatusCode, str] | None) -> AsyncIterator[None]:
        """Count the call while it runs; refuse it (unread) past the cap or without auth."""
        pool = "probes" if probe else "active"
        limit = PROBE_SLOTS if probe else self.max_concurrent
        if refusal is None and self.max_concurrent and getattr(self, pool) >= limit:
            if self._on_reject is not None:
                self._on_reject()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is at its cap of {limit} concurrent "
                + ("health probes" if probe else "RPCs (--max-concurrent-rpcs)")
                + "; retry later or use fewer parallel calls")
        setattr(self, pool, getattr(self, pool) + 1)
        try:
            if refusal is not None:  # an unauthenticated peer learns nothing, not even load
                await context.abort(*refusal)
            yield
        finally:
            setattr(self, pool, getattr(self, pool) - 1)


class _Call:
    """Wraps one call's behaviour so that it runs inside the gate's slot and reads its
    request(s) only once admitted."""

    def __init__(self, gate: LimitsInterceptor, message: str, refusal: tuple[grpc.StatusCode, str] | None,
                 probe: bool) -> None:
        self.gate, self.message, self.refusal, self.probe = gate, message, refusal, probe

    def unary(self, behaviour: Any, streaming_in: bool) -> Any:
        async def run(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            async with self.gate.slot(context, self.probe, self.refusal):
                request = await self._input(requests, context, streaming_in)
                return await behaviour(request, context)
        return run

    def streaming(self, behaviour: Any, streaming_in: bool) -> Any:
        if not inspect.isasyncgenfunction(behaviour):  # writes with context.write()
            return self.unary(behaviour, streaming_in)

        async def run(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self.gate.slot(context, self.probe, self.refusal):
                request = await self._input(requests, context, streaming_in)
                async for response in behaviour(request, context):
                    yield response
        return run

    async def _input(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext,
                     streaming_in: bool) -> Any:
        # Messages are read with context.read(), never through grpc's request iterator:
        # a call aborted while that iterator is suspended stays referenced forever (its
        # RPC state and request included), measured as a leak of ~1 MiB per refused
        # 1 MiB request in grpcio 1.85.
        if streaming_in:
            return _messages(context, self.message)
        request = await context.read()  # a unary method: its one message, read only now
        if request is grpc.aio.EOF:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the {self.message} call carried no request message")
        await _reject_garbage(request, context, self.message)
        return request


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # answered INVALID_ARGUMENT by the behaviour wrapper
            return _Garbage(exc)
    return parse


async def _reject_garbage(request: Any, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(request, _Garbage):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"the {method} request is not a valid protobuf message "
                            f"({type(request.error).__name__}: {str(request.error)[:200]})")


async def _messages(context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[Any]:
    while True:
        request = await context.read()
        if request is grpc.aio.EOF:
            return
        await _reject_garbage(request, context, method)
        yield request
