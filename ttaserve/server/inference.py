"""The Triton-compatible ``inference.GRPCInferenceService`` (transport only: decode,
call the model, encode; errors mapped in server/errors.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

import ttaserve
from ttaserve.errors import Unavailable
from ttaserve.proto import grpc_service_pb2 as pb
from ttaserve.proto import grpc_service_pb2_grpc as pb_grpc
from ttaserve.proto import model_config_pb2 as mc
from ttaserve.server.auth import Tokens, header_of
from ttaserve.server.convert import decode_request, encode_response
from ttaserve.server.errors import code_label, status_of
from ttaserve.server.keys import SessionKey
from ttaserve.server.metrics import ServerMetrics
from ttaserve.server.repository import Repository, ServedModel

EXTENSIONS = (
    "binary_tensor_data",
    "parameters",
    "sequence",
    "sequence(string_id)",
    "statistics",
    "model_configuration",
)


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self, repository: Repository, metrics: ServerMetrics, max_batch: int, idle_s: float,
        request_timeout_s: float = 0.0, tokens: Tokens | None = None,
    ) -> None:
        self.repository = repository
        self.tokens = tokens or Tokens()
        self.metrics = metrics
        self.max_batch = max_batch
        self.idle_s = idle_s
        self.request_timeout_s = request_timeout_s  # 0: only the client's deadline applies
        self.draining = False

    # -- health and metadata ----------------------------------------------------------
    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=not self.draining)

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        try:
            self.repository.get(request.name, request.version)
        except Exception:  # an unknown model is simply not ready (Triton's behaviour)
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not self.draining)

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="ttaserve", version=ttaserve.__version__, extensions=EXTENSIONS
        )

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        model = await self._model(request.name, request.version, context)
        spec = model.spec
        meta = pb.ModelMetadataResponse(name=spec.name, versions=[spec.version], platform=spec.platform)
        for tensors, target in ((spec.inputs, meta.inputs), (spec.outputs, meta.outputs)):
            for t in tensors:
                target.add(name=t.name, datatype=t.datatype, shape=t.shape)
        return meta

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        model = await self._model(request.name, request.version, context)
        return pb.ModelConfigResponse(config=self._config(model))

    def _config(self, model: ServedModel) -> mc.ModelConfig:
        spec = model.spec
        config = mc.ModelConfig(
            name=spec.name, platform=spec.platform, backend="ttaserve",
            max_batch_size=self.max_batch,
            sequence_batching=mc.ModelSequenceBatching(
                max_sequence_idle_microseconds=int(self.idle_s * 1e6),
                direct=mc.ModelSequenceBatching.StrategyDirect(),
            ),
        )
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
        for t in spec.inputs:
            config.input.add(name=t.name, data_type=mc.DataType.Value(f"TYPE_{t.datatype}"),
                             dims=t.shape[1:])
        for t in spec.outputs:
            config.output.add(name=t.name, data_type=mc.DataType.Value(f"TYPE_{t.datatype}"),
                              dims=t.shape[1:])
        if spec.labels:
            config.parameters["labels"].string_value = ",".join(spec.labels)
        config.parameters["tta_policy"].string_value = model.engine.default.name
        return config

    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        models = ([await self._model(request.name, request.version, context)]
                  if request.name else list(self.repository))
        response = pb.ModelStatisticsResponse()
        for model in models:
            response.model_stats.append(_statistics(model))
        return response

    async def RepositoryIndex(self, request: Any, context: Any) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for model in self.repository:
            response.models.add(name=model.name, version=model.spec.version, state="READY")
        return response

    # -- inference --------------------------------------------------------------------
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        response, error = await self._infer(request, None, context=context)
        if error is not None:
            await context.abort(*error)
        return response

    async def infer_unary(
        self, request: pb.ModelInferRequest, stream_session: SessionKey | None = None,
        used: set[ServedModel] | None = None, owner: str | None = None,
    ) -> tuple[pb.ModelInferResponse | None, tuple[grpc.StatusCode, str] | None]:
        """One request answered without a gRPC call around it (a Ray Serve replica's entry
        point): the response, or the status code and message to send instead. ``owner`` is
        the principal the caller authenticated (its sessions are the ones reached; without
        it, only a server without tokens answers). With ``stream_session``, a request
        without a sequence id uses that session, and its model is added to ``used`` (end
        the session there when the stream closes)."""
        return await self._infer(request, stream_session, used, owner=owner)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # Requests without a sequence id share one session scoped to this stream: its key
        # has a random part no client id can name (server/keys.py).
        stream_session = SessionKey(self._owner(context), None)
        used: set[ServedModel] = set()
        try:
            async for request in requests:
                response, error = await self._infer(request, stream_session, used, context)
                if error is not None:  # the stream stays open (Triton's default)
                    yield pb.ModelStreamInferResponse(error_message=f"[{error[0].name}] {error[1]}")
                else:
                    yield pb.ModelStreamInferResponse(infer_response=response)
        finally:
            for model in used:
                model.engine.sessions.end(stream_session)

    async def _infer(
        self, request: pb.ModelInferRequest, stream_session: SessionKey | None,
        used: set[ServedModel] | None = None, context: grpc.aio.ServicerContext | None = None,
        owner: str | None = None,
    ) -> tuple[pb.ModelInferResponse | None, tuple[grpc.StatusCode, str] | None]:
        started = time.perf_counter()
        model_name, policy = request.model_name, "unknown"
        try:
            if self.draining:
                raise Unavailable("the server is shutting down; retry on another replica")
            model = self.repository.get(request.model_name, request.model_version)
            decoded = decode_request(request, model.spec, self.max_batch)
            decoded.deadline = self._deadline(decoded.timeout_us, context)
            if decoded.sequence_id is not None:  # the caller's own session of that id
                if owner is None:
                    owner = stream_session.owner if stream_session is not None else self._owner(context)
                decoded.sequence_id = SessionKey(owner, decoded.sequence_id)
            elif stream_session is not None:
                decoded.sequence_id = stream_session
                if used is not None:
                    used.add(model)
            outputs, policy = await model.infer(decoded)
            response = encode_response(decoded, model.spec, outputs, policy)
            self._count(model_name, policy, grpc.StatusCode.OK, started)
            return response, None
        except Exception as exc:  # every failure becomes a status; the server lives on
            code, message = status_of(exc)
            self._count(model_name, policy, code, started)
            return None, (code, message)

    def _owner(self, context: grpc.aio.ServicerContext | None) -> str:
        """The calling principal's name (the gate has already authenticated the call)."""
        metadata = context.invocation_metadata() if context is not None else None
        return self.tokens.caller(header_of(metadata)).name

    def _deadline(self, timeout_us: int, context: grpc.aio.ServicerContext | None) -> float | None:
        """The earliest of the client's gRPC deadline, Triton's ``timeout`` parameter
        (microseconds) and --request-timeout, as a time.monotonic() value."""
        now = time.monotonic()
        limits = [self.request_timeout_s] if self.request_timeout_s > 0 else []
        if timeout_us > 0:
            limits.append(timeout_us / 1e6)
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None:
            limits.append(remaining)
        return now + min(limits) if limits else None

    def _count(self, name: str, policy: str, code: grpc.StatusCode, started: float) -> None:
        elapsed = time.perf_counter() - started
        known = self.repository.has(name)
        label = name if known else "unknown"  # never let clients mint label values
        self.metrics.requests.labels(label, policy, code_label(code)).inc()
        if not known:
            return
        stats = self.repository.get(name).stats
        if code == grpc.StatusCode.OK:
            self.metrics.request_seconds.labels(label, policy).observe(elapsed)
            stats.success_count += 1
            stats.success_ns += int(elapsed * 1e9)
        else:
            stats.fail_count += 1
            stats.fail_ns += int(elapsed * 1e9)

    async def _model(self, name: str, version: str, context: grpc.aio.ServicerContext) -> ServedModel:
        try:
            return self.repository.get(name, version)
        except Exception as exc:
            await context.abort(*status_of(exc))
            raise  # unreachable: abort raises


def _statistics(model: ServedModel) -> pb.ModelStatistics:
    s = model.stats
    d = pb.StatisticDuration
    stats = pb.ModelStatistics(
        name=model.name, version=model.spec.version, last_inference=s.last_inference_ms,
        inference_count=s.inference_count, execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=d(count=s.success_count, ns=s.success_ns),
            fail=d(count=s.fail_count, ns=s.fail_ns),
            queue=d(count=s.execution_count, ns=s.queue_ns),
            compute_infer=d(count=s.execution_count, ns=s.compute_ns),
        ),
    )
    for size, (count, ns) in sorted(s.batch_counts.items()):
        stats.batch_stats.add(batch_size=size, compute_infer=d(count=count, ns=ns))
    return stats
