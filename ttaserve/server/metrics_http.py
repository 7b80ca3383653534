"""The HTTP side: Prometheus ``/metrics`` on its own port, in a background thread."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Scrapes every few seconds would flood the log."""


class _ThreadingWSGIServer(ThreadingHTTPServer):
    daemon_threads = True


class MetricsHTTPServer:
    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        from wsgiref.simple_server import WSGIServer

        class Server(_ThreadingWSGIServer, WSGIServer):
            pass

        self._httpd = make_server(host, port, make_wsgi_app(registry), Server, _QuietHandler)
        self.port = self._httpd.server_port
        self.url = f"http://{host}:{self.port}/metrics"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
