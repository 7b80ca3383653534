"""The HTTP side, in a background thread: Prometheus ``/metrics`` and, on every other path,
an optional WSGI app (the live dashboard, see dashboard.py).

A thread serves each connection, so connections are bounded: at most ``MAX_CONNECTIONS``
at once (one more is closed unanswered) and each is dropped after ``IDLE_TIMEOUT_S`` of
silence, so idle or trickling clients cannot pin threads and starve the scraper."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from http.server import ThreadingHTTPServer
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


MAX_CONNECTIONS = 64
IDLE_TIMEOUT_S = 10.0


class _QuietHandler(WSGIRequestHandler):
    timeout = IDLE_TIMEOUT_S  # socket timeout per connection (slow or idle clients)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Scrapes every few seconds would flood the log."""


class _ThreadingWSGIServer(ThreadingHTTPServer):
    daemon_threads = True

    def server_activate(self) -> None:
        super().server_activate()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)  # per server, not per class

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # over the cap: closed, not queued
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _not_found(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"metrics are at /metrics\n"]


class MetricsHTTPServer:
    """``pages`` serves every path but ``/metrics``; if it has ``close()``, :meth:`stop`
    calls it."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, pages: WSGIApp | None = None) -> None:
        from wsgiref.simple_server import WSGIServer

        class Server(_ThreadingWSGIServer, WSGIServer):
            pass

        metrics_app, self._pages = make_wsgi_app(registry), pages

        def route(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") == "/metrics":
                return metrics_app(environ, start_response)
            return (pages or _not_found)(environ, start_response)

        self._httpd = make_server(host, port, route, Server, _QuietHandler)
        self.port = self._httpd.server_port
        self.base_url = f"http://{host}:{self.port}/"
        self.url = f"{self.base_url}metrics"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        close = getattr(self._pages, "close", None)
        if close is not None:
            close()
