"""Transport-level limits checked around every RPC: a cap on concurrent RPCs and a clear answer to
bytes that are not a protobuf message.

- ``--max-concurrent-rpcs``: at most this many RPCs of the inference and control services
  run at once (a stream counts once, for its whole life); one more is answered
  ``RESOURCE_EXHAUSTED`` naming the cap, immediately, instead of queueing without bound.
  Health checks and reflection are never counted, so probes work under full load.
- A request that does not parse as the method's message is answered ``INVALID_ARGUMENT``
  (gRPC's default would be ``UNKNOWN``). On a stream the stream is closed with that status:
  a peer that sends unparseable frames cannot be answered message by message.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

_UNCOUNTED = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class _Garbage:
    """Stands in for a request that failed to parse."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class LimitsInterceptor(grpc.aio.ServerInterceptor):
    """Counts RPCs against ``--max-concurrent-rpcs`` and turns unparseable requests into
    INVALID_ARGUMENT (see the module docstring)."""

    def __init__(self, max_concurrent: int = 0, on_reject: Callable[[], None] | None = None) -> None:
        self.max_concurrent = max_concurrent  # 0: no cap
        self.active = 0  # touched only on the event loop
        self._on_reject = on_reject

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_UNCOUNTED):
            return handler
        message = details.method.rsplit("/", 1)[-1]
        deserialize = _tolerant(handler.request_deserializer)
        serialize = handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, message), deserialize, serialize)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_stream(handler.unary_stream, message), deserialize, serialize)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._stream_unary(handler.stream_unary, message), deserialize, serialize)
        return grpc.stream_stream_rpc_method_handler(
            self._stream_stream(handler.stream_stream, message), deserialize, serialize)

    async def _enter(self, context: grpc.aio.ServicerContext) -> bool:
        if self.max_concurrent and self.active >= self.max_concurrent:
            if self._on_reject is not None:
                self._on_reject()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is at its cap of {self.max_concurrent} concurrent RPCs "
                f"(--max-concurrent-rpcs); retry later or use fewer parallel calls")
        self.active += 1
        return True

    def _exit(self, entered: bool) -> None:
        if entered:
            self.active -= 1

    def _unary(self, behaviour: Any, message: str) -> Any:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await _reject_garbage(request, context, message)
            entered = await self._enter(context)
            try:
                return await behaviour(request, context)
            finally:
                self._exit(entered)
        return run

    def _unary_stream(self, behaviour: Any, message: str) -> Any:
        if not inspect.isasyncgenfunction(behaviour):  # writes with context.write()
            return self._unary(behaviour, message)

        async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await _reject_garbage(request, context, message)
            entered = await self._enter(context)
            try:
                async for response in behaviour(request, context):
                    yield response
            finally:
                self._exit(entered)
        return run

    def _stream_unary(self, behaviour: Any, message: str) -> Any:
        async def run(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            entered = await self._enter(context)
            try:
                return await behaviour(_checked(requests, context, message), context)
            finally:
                self._exit(entered)
        return run

    def _stream_stream(self, behaviour: Any, message: str) -> Any:
        if not inspect.isasyncgenfunction(behaviour):  # writes with context.write()
            return self._stream_unary(behaviour, message)

        async def run(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            entered = await self._enter(context)
            try:
                async for response in behaviour(_checked(requests, context, message), context):
                    yield response
            finally:
                self._exit(entered)
        return run


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
                            f"({type(request.error).__name__}: {request.error})")


async def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext,
                   method: str) -> AsyncIterator[Any]:
    async for request in requests:
        await _reject_garbage(request, context, method)
        yield request
