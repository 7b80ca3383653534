"""One ttaserve replica as a Ray Serve deployment behind Ray's gRPC proxy.

Ray's proxy calls the deployment method named like the gRPC method (``ModelInfer``,
``ModelMetadata``, ...) with the decoded request and a ``grpc_context`` to set the status
on. Each replica runs a complete ttaserve server in its own process (its engines, workers,
metrics and dashboard; its own gRPC port on loopback for direct access), and keeps its
sessions in the shared store (ttaserve/deploy/shared.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from typing import Any

import grpc

from ttaserve.deploy.affinity import request_session_key
from ttaserve.deploy.metrics import ANNOUNCE_EVERY_S, REGISTRY
from ttaserve.deploy.shared import SharedSessions
from ttaserve.deploy.stores import SnapshotStore, open_store
from ttaserve.proto import grpc_service_pb2 as pb
from ttaserve.server.app import INFERENCE_SERVICE, Server, start, start_flushing
from ttaserve.server.auth import check as auth_check
from ttaserve.server.auth import header_of
from ttaserve.server.keys import SessionKey
from ttaserve.server.settings import ServerSettings

log = logging.getLogger(__name__)

REPLICA_PARAM = "ttaserve_replica"  # response parameter: which replica answered


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _AbortContext:
    """The part of a grpc.aio context the metadata handlers use (abort), turned into an
    exception the replica maps onto Ray's gRPC context."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise _Aborted(code, details)

    def time_remaining(self) -> float | None:
        return None


class TtaserveReplica:
    """The deployment class (wrapped by ``serve.deployment`` in ttaserve.deploy.cli)."""

    async def __init__(  # type: ignore[misc]  # Ray Serve awaits an async constructor
        self, settings: dict[str, Any], store_url: str, interval_s: float, replica_id: str | None = None,
    ) -> None:
        self.replica_id = replica_id or _ray_replica_id()
        self._handle: Any = None  # to this deployment itself, for stream messages (lazy)
        self.settings = ServerSettings(**settings)
        self.server: Server = await start(self.settings)
        # Proxied calls never pass the replica's own gRPC interceptors: check tokens here.
        self.tokens = self.server.inference.tokens
        self.store: SnapshotStore = open_store(store_url)
        for model in self.server.repository:
            shared = SharedSessions(self.store, model.name, model.engine, self.server.metrics, interval_s,
                                    secret=self.server.secret)
            model.state_store = shared
        if interval_s > 0:  # the server's own periodic writer; Server.stop cancels it
            self.server.state_flush = start_flushing(self.server.repository, interval_s)
        loop = asyncio.get_running_loop()
        self._announce()
        self._heartbeat = loop.create_task(self._announce_forever())
        log.info("replica %s ready (gRPC 127.0.0.1:%d)", self.replica_id, self.server.grpc_port)

    def _announce(self) -> None:
        """Tell the driver where this replica's metrics are (it labels them by replica)."""
        http = self.server.metrics_http
        host = self.settings.host
        if host in ("0.0.0.0", "::", ""):  # bound everywhere: announce an address others can use
            import ray

            host = ray.util.get_node_ip_address()
        metrics_url = http.url.replace(f"//{self.settings.host}:", f"//{host}:") if http else None
        info = {"replica": self.replica_id, "grpc": f"{host}:{self.server.grpc_port}",
                "metrics": metrics_url, "pid": os.getpid(), "seen": time.time()}
        self.store.write(f"{REGISTRY}/{self.replica_id}", json.dumps(info).encode())

    async def _announce_forever(self) -> None:
        """Refresh the announcement: one not refreshed for ANNOUNCEMENT_TTL_S is a dead
        replica's (a SIGKILLed replica cannot remove its own) and is dropped by readers."""
        while True:
            await asyncio.sleep(ANNOUNCE_EVERY_S)
            try:
                await asyncio.to_thread(self._announce)
            except Exception as exc:  # the store is down: metrics discovery waits for it
                log.warning("cannot refresh the replica announcement: %s", exc)

    # -- inference ----------------------------------------------------------------------
    def _refusal(self, method: str, grpc_context: Any) -> tuple[grpc.StatusCode, str] | None:
        if not self.tokens.enabled:
            return None
        metadata = grpc_context.invocation_metadata() if grpc_context is not None else ()
        return auth_check(self.tokens, f"/{INFERENCE_SERVICE}/{method}", metadata)

    def _owner(self, grpc_context: Any) -> str:
        """The principal of an authenticated call: its sessions are the ones it reaches."""
        metadata = grpc_context.invocation_metadata() if grpc_context is not None else ()
        return self.tokens.caller(header_of(metadata)).name

    async def ModelInfer(self, request: pb.ModelInferRequest, grpc_context: Any = None) -> Any:
        refusal = self._refusal("ModelInfer", grpc_context)
        if refusal is not None:
            return _fail(grpc_context, *refusal, pb.ModelInferResponse())
        response, error = await self.server.inference.infer_unary(request, owner=self._owner(grpc_context))
        if error is not None:
            return _fail(grpc_context, *error, pb.ModelInferResponse())
        assert response is not None
        response.parameters[REPLICA_PARAM].string_param = self.replica_id
        return response

    async def ModelStreamInfer(self, requests: Any, grpc_context: Any = None) -> Any:
        """A bidirectional stream through the proxy. Ray routes a stream once, before its
        first message, so it lands on any replica; that replica sends each message with a
        sequence id on through a deployment handle, whose session-affinity router picks the
        sequence's owner (one extra hop per message). Messages without a sequence id share
        a session scoped to the stream, kept here, as on a single server."""
        refusal = self._refusal("ModelStreamInfer", grpc_context)
        if refusal is not None:
            _fail(grpc_context, *refusal, None)
            return
        owner = self._owner(grpc_context)
        stream_session = SessionKey(owner, None, uuid.uuid4().hex)
        used: set[Any] = set()
        try:
            async for request in requests:
                if request_session_key(request) is None:
                    response, error = await self.server.inference.infer_unary(request, stream_session, used)
                else:
                    response, error = await self._routed(request, owner)
                if error is not None:  # the stream stays open (Triton's default)
                    yield pb.ModelStreamInferResponse(error_message=f"[{error[0].name}] {error[1]}")
                else:
                    assert response is not None
                    response.parameters[REPLICA_PARAM].string_param = response.parameters[
                        REPLICA_PARAM].string_param or self.replica_id
                    yield pb.ModelStreamInferResponse(infer_response=response)
        finally:
            for model in used:
                model.engine.sessions.end(stream_session)

    async def _routed(self, request: pb.ModelInferRequest,
                      owner: str) -> tuple[Any, tuple[grpc.StatusCode, str] | None]:
        if self._handle is None:
            from ray import serve

            context = serve.get_replica_context()
            self._handle = serve.get_deployment_handle(context.deployment, context.app_name)
        try:
            # owner by keyword: the affinity router routes calls whose one positional
            # argument is the request (deploy/router.py)
            data, error = await self._handle.infer_routed.remote(request, owner=owner)
        except Exception as exc:  # the owner died under this message: the client may retry it
            return None, (grpc.StatusCode.UNAVAILABLE, f"the replica of this sequence failed: {exc}")
        if error is not None:
            return None, (grpc.StatusCode[error[0]], error[1])
        return pb.ModelInferResponse.FromString(data), None

    async def infer_routed(self, request: pb.ModelInferRequest,
                           owner: str) -> tuple[bytes | None, tuple[str, str] | None]:
        """A stream's message, on the replica that owns its sequence (plain, picklable types);
        ``owner`` is the principal the receiving replica authenticated."""
        response, error = await self.server.inference.infer_unary(request, owner=owner)
        if error is not None:
            return None, (error[0].name, error[1])
        assert response is not None
        response.parameters[REPLICA_PARAM].string_param = self.replica_id
        return response.SerializeToString(), None

    # -- health and metadata (answered by this replica's server) -------------------------
    async def Check(self, request: Any, grpc_context: Any = None) -> Any:
        """grpc.health.v1 Check through the proxy (Kubernetes gRPC probes, load balancers):
        SERVING while this replica serves; Ray routes it to any replica."""
        from grpc_health.v1 import health_pb2

        serving = not self.server.inference.draining
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def ServerLive(self, request: Any, grpc_context: Any = None) -> Any:
        return await self._call("ServerLive", request, grpc_context, pb.ServerLiveResponse)

    async def ServerReady(self, request: Any, grpc_context: Any = None) -> Any:
        return await self._call("ServerReady", request, grpc_context, pb.ServerReadyResponse)

    async def ModelReady(self, request: Any, grpc_context: Any = None) -> Any:
        return await self._call("ModelReady", request, grpc_context, pb.ModelReadyResponse)

    async def ServerMetadata(self, request: Any, grpc_context: Any = None) -> Any:
        return await self._call("ServerMetadata", request, grpc_context, pb.ServerMetadataResponse)

    async def ModelMetadata(self, request: Any, grpc_context: Any = None) -> Any:
        return await self._call("ModelMetadata", request, grpc_context, pb.ModelMetadataResponse)

    async def ModelConfig(self, request: Any, grpc_context: Any = None) -> Any:
        return await self._call("ModelConfig", request, grpc_context, pb.ModelConfigResponse)

    async def ModelStatistics(self, request: Any, grpc_context: Any = None) -> Any:
        """This replica's counters only (each replica counts what it served)."""
        return await self._call("ModelStatistics", request, grpc_context, pb.ModelStatisticsResponse)

    async def RepositoryIndex(self, request: Any, grpc_context: Any = None) -> Any:
        return await self._call("RepositoryIndex", request, grpc_context, pb.RepositoryIndexResponse)

    async def _call(self, method: str, request: Any, grpc_context: Any, empty: Any) -> Any:
        refusal = self._refusal(method, grpc_context)
        if refusal is not None:
            return _fail(grpc_context, *refusal, empty())
        try:
            return await getattr(self.server.inference, method)(request, _AbortContext())
        except _Aborted as exc:
            return _fail(grpc_context, exc.code, exc.details, empty())

    # -- lifecycle ----------------------------------------------------------------------
    async def check_health(self) -> None:
        """Ray Serve's health check: the replica's own server must still be serving."""
        if self.server.inference.draining:
            raise RuntimeError("replica is draining")

    async def __del__(self) -> None:
        """Ray Serve calls this on graceful shutdown: drain, write every session, deregister."""
        self._heartbeat.cancel()
        await self.server.stop()  # writes every changed session ("shutdown")
        self.store.delete(f"{REGISTRY}/{self.replica_id}")
        self.store.close()


def _fail(grpc_context: Any, code: grpc.StatusCode, details: str, empty: Any) -> Any:
    if grpc_context is None:  # called through a deployment handle, not the proxy
        raise RuntimeError(f"{code.name}: {details}")
    grpc_context.set_code(code)
    grpc_context.set_details(details)
    return empty


def _ray_replica_id() -> str:
    from ray import serve

    return str(serve.get_replica_context().replica_id.unique_id)
