"""Every call counts against --max-concurrent-rpcs, refused ones included; past the cap a
call is refused unread; probes keep working; unauthenticated calls learn nothing; the HTTP
side bounds its connections."""

from __future__ import annotations

import queue
import socket
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.security.attacks import MODEL_INFER, _request
from tests.security.conftest import write_tokens
from tests.server.conftest import images, infer_input, running_server
from ttaserve.server import metrics_http


def test_every_call_counts_and_over_the_cap_is_refused_unread(tmp_path: Path) -> None:
    with running_server(auth_token_file=str(write_tokens(tmp_path)), max_concurrent_rpcs=2) as handle:
        clients, results = [], queue.Queue()  # type: ignore[var-annotated]
        for _ in range(2):  # two streams hold both slots for their whole life
            client = handle.client()
            client.start_stream(callback=lambda result, error: results.put(error), headers={"authorization": "Bearer alice-token"})
            client.async_stream_infer("demo", [infer_input(images(2))], sequence_id=1)
            clients.append(client)
        assert all(results.get(timeout=30) is None for _ in range(2))
        with grpc.insecure_channel(handle.url, options=[("grpc.max_send_message_length", 128 << 20)]) as channel:
            call = channel.unary_unary(MODEL_INFER)
            started = time.monotonic()
            for body in (_request(), _request(padding=60 << 20)):  # a 60 MB body is not read either
                try:
                    call(body, metadata=(("authorization", "Bearer alice-token"),), timeout=30)
                    raise AssertionError("accepted past the cap")
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-concurrent-rpcs" in exc.details()
            assert time.monotonic() - started < 10
            try:  # no token: refused for that, not for the load (it learns nothing about it)
                call(_request(), timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING  # probes have reserved slots
        assert handle.client().is_server_live()
        for client in clients:
            client.stop_stream()
        deadline = time.monotonic() + 10
        while True:
            try:
                handle.client().infer("demo", [infer_input(images(2))], headers={"authorization": "Bearer alice-token"})
                break
            except Exception:
                assert time.monotonic() < deadline, "slots were not released"
                time.sleep(0.1)


def test_health_watch_needs_a_token_and_a_slot(tmp_path: Path) -> None:
    """Check stays open for probes; Watch, a stream that stays open, is a counted call."""
    with running_server(auth_token_file=str(write_tokens(tmp_path)), max_concurrent_rpcs=1) as handle, \
            grpc.insecure_channel(handle.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            next(health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = (("authorization", "Bearer alice-token"),)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), metadata=token, timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # holds the one slot
        with pytest.raises(InferenceServerException, match="RESOURCE_EXHAUSTED"):
            handle.client().infer("demo", [infer_input(images(2))], headers={"authorization": "Bearer alice-token"})
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status \
            == health_pb2.HealthCheckResponse.SERVING  # probes have their own pool
        watch.cancel()


def test_http_connections_are_bounded(tmp_path: Path) -> None:
    with running_server() as handle:
        port = handle.server.metrics_http.port  # type: ignore[union-attr]
        threads_before = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(metrics_http.MAX_CONNECTIONS + 36)]
        time.sleep(0.5)
        assert threading.active_count() - threads_before <= metrics_http.MAX_CONNECTIONS
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(handle.metrics_url, timeout=5).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "the metrics endpoint did not recover"
                time.sleep(0.2)
