"""``python -m ttaserve.healthcheck [HOST:PORT] [--service NAME]``: exit 0 when the server's
gRPC health service answers SERVING, 1 otherwise (the container's HEALTHCHECK; also usable
as an exec probe). Health checks need no token even when auth is on."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout_s: float = 3.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ttaserve.healthcheck", description=__doc__)
    parser.add_argument("address", nargs="?", default="127.0.0.1:8001")
    parser.add_argument("--service", default="", help="service name ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    args = parser.parse_args(argv)
    healthy = check(args.address, args.service, args.timeout)
    print("SERVING" if healthy else "NOT SERVING", file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
