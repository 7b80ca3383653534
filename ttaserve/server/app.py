"""Assemble and run the server: gRPC (inference, health, reflection) + HTTP metrics."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ttaserve.adapters.safety import SafetyConfig
from ttaserve.handlers.loader import LoadedModel, demo_model, load_repository
from ttaserve.outliers import OutlierConfig
from ttaserve.proto import control_pb2 as control_pb
from ttaserve.proto import control_pb2_grpc as control_grpc
from ttaserve.proto import grpc_service_pb2 as pb
from ttaserve.proto import grpc_service_pb2_grpc as pb_grpc
from ttaserve.proto._pool import POOL
from ttaserve.server.auth import Tokens
from ttaserve.server.control import ControlService
from ttaserve.server.dashboard import Dashboard
from ttaserve.server.disk_budget import DiskBudget
from ttaserve.server.inference import InferenceService
from ttaserve.server.limits import LimitsInterceptor
from ttaserve.server.memory import keep_freed_memory
from ttaserve.server.metrics import ServerMetrics
from ttaserve.server.metrics_http import MetricsHTTPServer
from ttaserve.server.persistence import StateLimits, StateStore
from ttaserve.server.repository import Repository, ServedModel
from ttaserve.server.secret import load_secret
from ttaserve.server.settings import ServerSettings
from ttaserve.sessions import SessionLimits

log = logging.getLogger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
CONTROL_SERVICE = control_pb.DESCRIPTOR.services_by_name["AdaptationService"].full_name


def load_models(settings: ServerSettings) -> list[LoadedModel]:
    models = [demo_model()] if settings.demo else []
    if settings.model_repository:
        models += load_repository(settings.model_repository)
    if not models:
        raise ValueError("no model to serve: pass --model-repository DIR or keep the demo model")
    return models


@dataclass
class Server:
    """A running server; ``await stop()`` drains it."""

    settings: ServerSettings
    grpc_server: grpc.aio.Server
    inference: InferenceService
    health: health.aio.HealthServicer
    repository: Repository
    metrics: ServerMetrics
    metrics_http: MetricsHTTPServer | None
    grpc_port: int
    control: ControlService
    housekeeping: asyncio.Task[None] | None = None
    state_flush: asyncio.Task[None] | None = None  # periodic writes under --state-dir
    secret: bytes = b""  # signs snapshots and state files (server/secret.py)

    async def stop(self, grace: float | None = None) -> None:
        """Drain truthfully: health NOT_SERVING and new requests UNAVAILABLE at once;
        requests already queued or running may finish within ``grace``; past it, those that
        have not started are answered UNAVAILABLE without running (not applied), and the
        server exits after at most one more forward pass per model worker."""
        grace = self.settings.grace_s if grace is None else grace
        deadline = asyncio.get_running_loop().time() + grace
        self.inference.draining = True
        await self.health.enter_graceful_shutdown()
        await _until_idle(self.repository, deadline)
        for model in self.repository:
            model.close()
        await _until_idle(self.repository, None)  # refusals are immediate; at most one forward runs
        await self.grpc_server.stop(0.5)  # answers are out; streams still open are cancelled
        if self.housekeeping is not None:
            self.housekeeping.cancel()
        if self.state_flush is not None:
            self.state_flush.cancel()
        self.control.shutdown()
        for model in self.repository:
            model.shutdown()
        # After the workers finished: the files hold every update that was answered.
        await asyncio.to_thread(_flush_states, self.repository, "shutdown")
        if self.metrics_http is not None:
            self.metrics_http.stop()
        log.info("server stopped")


def safety_config(settings: ServerSettings) -> SafetyConfig:
    """The safety net of every model, from --no-safety-net and --safety KEY=VALUE."""
    return SafetyConfig.from_params({**settings.safety_params, "enabled": settings.safety_net})


async def start(settings: ServerSettings) -> Server:
    if settings.keep_freed_memory:
        keep_freed_memory()
    metrics = ServerMetrics()
    limits = SessionLimits(settings.session_idle_s, settings.max_sessions, settings.strict_sequences)
    served = [
        ServedModel(m, settings.policy, settings.policy_params, limits, metrics, settings.workers_per_model,
                    settings.max_batch_size, settings.batch_delay_us / 1e6, max_queue=settings.max_queue,
                    outliers=OutlierConfig(enabled=settings.outlier_divergence > 0,
                                           max_divergence=settings.outlier_divergence or 15.0),
                    max_session_bytes=settings.max_session_memory,
                    safety=safety_config(settings))
        for m in load_models(settings)
    ]
    secret = load_secret(settings.secret_file, settings.state_dir, settings.secret)
    if settings.state_dir:
        _restore_states(served, settings, secret, metrics)
    repository = Repository(served)
    metrics.watch_sessions(lambda: (row for model in repository for row in model.session_signals()))
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Without the bandwidth-delay probe a stream's receive window grows only when the
        # server reads a message, so a call refused before its body is read buffers ~64 KiB
        # instead of many MiB (16 unauthenticated 60 MB calls: RSS +2 MiB instead of +36 to
        # +264 MiB). A message being read still gets a window as large as itself.
        ("grpc.http2.bdp_probe", 0),
    ]
    tokens = Tokens.load(settings.auth_token_file)
    # One interceptor: auth first (an unauthenticated peer learns nothing, not even that
    # the server is busy), then the concurrency cap, both before a request body is read.
    limits = LimitsInterceptor(settings.max_concurrent_rpcs,
                               lambda: metrics.rejected.labels("*", "max_concurrent_rpcs").inc(), tokens)
    server = grpc.aio.server(options=options, interceptors=[limits])
    inference = InferenceService(repository, metrics, settings.max_batch_size, settings.session_idle_s,
                                 settings.request_timeout_s, tokens)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)
    control = ControlService(repository, tokens, secret, lambda: inference.draining)
    control_grpc.add_AdaptationServiceServicer_to_server(control, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (INFERENCE_SERVICE, CONTROL_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server,
        pool=_reflection_pool(),
    )
    address = f"{settings.host}:{settings.grpc_port}"
    credentials = _tls_credentials(settings)
    port = (server.add_secure_port(address, credentials) if credentials
            else server.add_insecure_port(address))
    if port == 0:
        raise OSError(f"cannot bind gRPC on {settings.host}:{settings.grpc_port}")
    await server.start()
    for name in ("", INFERENCE_SERVICE, CONTROL_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics_http = None
    if settings.metrics_port >= 0:
        dashboard = Dashboard(repository, metrics, tokens, settings.host, draining=lambda: inference.draining)
        metrics_http = MetricsHTTPServer(metrics.registry, settings.host, settings.metrics_port, dashboard)
    housekeeping = asyncio.get_running_loop().create_task(
        _expire_sessions(repository, settings.session_idle_s)
    )
    log.info("serving %s on %s:%d (gRPC%s, auth %s), metrics on %s", [m.name for m in served],
             settings.host, port, "+TLS" if credentials else "", "on" if tokens.enabled else "off",
             metrics_http.url if metrics_http else "off")
    return Server(settings, server, inference, health_servicer, repository, metrics,
                  metrics_http, port, control, housekeeping,
                  start_flushing(repository, settings.state_interval_s) if settings.state_dir else None,
                  secret=secret)


def _restore_states(served: list[ServedModel], settings: ServerSettings, secret: bytes,
                    metrics: ServerMetrics) -> None:
    limits = StateLimits(settings.state_max_bytes, settings.state_max_file_bytes, settings.state_ttl_s)
    budget = DiskBudget(limits.max_bytes)
    for model in served:
        store = StateStore(settings.state_dir or "", model.name, model.engine, metrics, secret, limits, budget)
        model.state_store = store
        store.restore_all()
        for session in model.engine.sessions.live():
            model.sessions_changed(session.sequence_id)


async def _until_idle(repository: Repository, deadline: float | None) -> None:
    """Wait until no model has a request queued or running (or until ``deadline``)."""
    loop = asyncio.get_running_loop()
    while any(model.pending for model in repository):
        if deadline is not None and loop.time() >= deadline:
            return
        await asyncio.sleep(0.01)


def _tls_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert:
        if settings.tls_key or settings.tls_client_ca:
            raise ValueError("--tls-key/--tls-client-ca need --tls-cert")
        return None
    if not settings.tls_key:
        raise ValueError("--tls-cert needs --tls-key")
    read = lambda path: open(path, "rb").read()  # noqa: E731
    ca = read(settings.tls_client_ca) if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(read(settings.tls_key), read(settings.tls_cert))], root_certificates=ca,
        require_client_auth=ca is not None,
    )


def _reflection_pool() -> Any:
    """Our private descriptor pool plus the health and reflection services, so that
    reflection clients (grpcurl) can discover everything the server offers."""
    from grpc_health.v1 import health_pb2 as h
    from grpc_reflection.v1alpha import reflection_pb2 as r

    for module in (h, r):
        try:
            POOL.FindFileByName(module.DESCRIPTOR.name)
        except KeyError:
            POOL.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return POOL


async def _expire_sessions(repository: Repository, idle_s: float) -> None:
    period = max(1.0, min(60.0, idle_s / 4))
    while True:
        await asyncio.sleep(period)
        for model in repository:
            model.engine.sessions.expire_idle()
            model.metrics.live_sessions.labels(model.name).set(len(model.engine.sessions))


def _flush_states(repository: Repository, reason: str) -> None:
    for model in repository:
        if model.state_store is not None:
            model.state_store.flush(reason)


def start_flushing(repository: Repository, interval_s: float) -> asyncio.Task[None]:
    """Write every model's changed sessions every ``interval_s`` (``Server.stop`` cancels it)."""
    async def flush_forever() -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(_flush_states, repository, "periodic")
            except Exception:  # a failed round is logged; the next one retries
                log.exception("periodic state flush failed")
    return asyncio.get_running_loop().create_task(flush_forever())


async def serve(settings: ServerSettings) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    server = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ttaserve ready: gRPC {settings.host}:{server.grpc_port}"
          + (f", metrics {server.metrics_http.url} (dashboard {server.metrics_http.base_url})"
             if server.metrics_http else ""), flush=True)
    await stop.wait()
    log.info("signal received, draining for up to %.1f s", settings.grace_s)
    await server.stop()
