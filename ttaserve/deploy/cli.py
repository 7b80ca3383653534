"""``ttaserve ray-serve``: N ttaserve replicas behind Ray Serve's gRPC proxy.

Also usable from a Serve config file (``serve run`` / ``serve deploy``) through
:func:`app_builder` and a ``grpc_options`` section naming :data:`SERVICER_FUNCTIONS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
from typing import Any

log = logging.getLogger(__name__)

APP_NAME = "ttaserve"
DEPLOYMENT_NAME = "ttaserve"
SERVICER_FUNCTIONS = (
    "ttaserve.proto.grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",  # Check (not Watch)
)
ROUTER_CLASS = "ttaserve.deploy.router:SessionAffinityRouter"


def add_command(sub: Any) -> None:
    from ttaserve.cli_args import logging_flags
    from ttaserve.cli_options import add_server_options

    p = sub.add_parser(
        "ray-serve", help="run N replicas behind Ray Serve's gRPC proxy (pip install ttaserve[ray])",
        parents=[logging_flags()],
        description="Serve with Ray Serve: every request of one (model, sequence_id) reaches the same "
        "replica (consistent hashing), sessions are written to a shared state store and restored "
        "elsewhere when a replica dies. --grpc-port is the proxy's port (Ray binds it on every "
        "interface), --metrics-port serves every replica's metrics with a replica label; the other "
        "options configure each replica.")
    add_server_options(p)
    p.add_argument("--replicas", type=int, default=2, help="number of replicas (default 2)")
    p.add_argument("--state-store", metavar="URL",
                   help="required: where sessions live, a directory every replica sees (path or "
                   "file:///…) or redis://host:port/db")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per replica (default 1)")
    p.add_argument("--replica-host", default="127.0.0.1",
                   help="address each replica's own gRPC and metrics endpoints bind (default loopback; "
                   "0.0.0.0 on a multi-node cluster so the driver can scrape them)")
    p.add_argument("--max-ongoing-requests", type=int, default=32,
                   help="requests in flight per replica before the proxy queues them (default 32)")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (default: start a local one)")
    p.set_defaults(run=run, state_interval_s=None)


def replica_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ServerSettings each replica runs with: its own ports on --replica-host."""
    from ttaserve.cli_options import settings_from_args

    if args.state_dir:
        raise ValueError("ray-serve keeps sessions in --state-store (shared by all replicas), not --state-dir")
    settings = settings_from_args(args)
    return shared_secret({**dataclasses.asdict(settings), "host": args.replica_host, "grpc_port": 0,
                          "metrics_port": 0, "state_dir": None})


def shared_secret(settings: dict[str, Any]) -> dict[str, Any]:
    """Replicas verify each other's session records (server/sealing.py), so they need one
    secret: --secret-file (a file every replica reads), else one made here for this
    deployment. The made one lives as long as the deployment: records written under it are
    refused after a new `ray-serve` start (their sequences start fresh); give --secret-file
    to keep them across restarts."""
    if settings.get("secret_file") or settings.get("secret"):
        return settings
    import secrets

    return {**settings, "secret": secrets.token_hex(32)}


def build_deployment(replicas: int, replica_cpus: float = 1.0, max_ongoing_requests: int = 32) -> Any:
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from ttaserve.deploy.replica import TtaserveReplica

    return serve.deployment(
        TtaserveReplica, name=DEPLOYMENT_NAME, num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus},
        max_ongoing_requests=max_ongoing_requests,
        request_router_config=RequestRouterConfig(request_router_class=ROUTER_CLASS),  # type: ignore[arg-type]
        health_check_period_s=2, health_check_timeout_s=10, graceful_shutdown_timeout_s=20,
    )


def app_builder(config: dict[str, Any]) -> Any:
    """For Serve config files: ``import_path: ttaserve.deploy.cli:app_builder`` with ``args``
    ``{replicas, state_store, state_interval, settings: {ServerSettings fields}}``."""
    settings = shared_secret({**config.get("settings", {}), "grpc_port": 0, "metrics_port": 0, "state_dir": None})
    deployment = build_deployment(int(config.get("replicas", 2)), float(config.get("replica_cpus", 1.0)))
    return deployment.bind(settings, str(config["state_store"]), float(config.get("state_interval", 0.0)))


def run(args: argparse.Namespace) -> int:
    import ray  # a missing extra is reported by ttaserve.cli with its pip command
    from ray import serve

    from ttaserve.deploy.metrics import serve_metrics
    from ttaserve.deploy.stores import open_store

    if not args.state_store:
        raise ValueError("ray-serve needs --state-store: a directory every replica sees, or "
                         "redis://host:port/db (sessions live there so that replicas can fail over)")
    settings = replica_settings(args)
    interval = 0.0 if args.state_interval_s is None else float(args.state_interval_s)
    store = open_store(args.state_store)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=args.ray_address, include_dashboard=False, logging_level=logging.WARNING)
    serve.start(
        http_options={"host": "127.0.0.1", "port": 0 if args.ray_address is None else 8000},
        grpc_options={"port": args.grpc_port or 8001, "grpc_servicer_functions": list(SERVICER_FUNCTIONS)},
    )
    deployment = build_deployment(args.replicas, args.replica_cpus, args.max_ongoing_requests)
    serve.run(deployment.bind(settings, args.state_store, interval), name=APP_NAME, route_prefix="/")
    metrics_port = 8002 if args.metrics_port is None else args.metrics_port
    http = serve_metrics(store, args.host or "127.0.0.1", metrics_port) if metrics_port >= 0 else None
    print(f"ttaserve ray-serve ready: {args.replicas} replicas, gRPC proxy :{args.grpc_port or 8001}"
          + (f", metrics {http.url}" if http else "") + f", state store {args.state_store}", flush=True)
    _wait_for_signal()
    log.info("shutting down Ray Serve (replicas write their sessions first)")
    serve.shutdown()
    if http is not None:
        http.stop()
    store.close()
    return 0


def _wait_for_signal() -> None:
    received: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: received.append(s))
    while not received:
        signal.pause()
