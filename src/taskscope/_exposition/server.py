"""A standalone metrics server on its own thread (for apps that do not serve /metrics)."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from taskscope._exposition.render import Rendered, error_response, negotiate, render

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

_PATHS = ("/", "/metrics")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    registry: Collector | None = None
    gzip = True
    polite = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, *, send_body: bool) -> None:
        url = urlsplit(self.path)
        if url.path not in _PATHS:
            response = error_response(404, "Not Found")
        else:
            names = tuple(parse_qs(url.query).get("name[]", ()))
            negotiated = negotiate(
                self.headers.get("Accept", ""),
                self.headers.get("Accept-Encoding", ""),
                names,
                allow_gzip=self.server.gzip,
            )
            try:
                response = render(negotiated, self.server.registry, polite=self.server.polite)
            except Exception:
                self.log_error("rendering metrics failed")
                response = error_response(500, "rendering metrics failed")
        self._send(response, send_body=send_body)

    def _send(self, response: Rendered, *, send_body: bool) -> None:
        self.send_response(response.status)
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds are not worth a log line."""


class MetricsServer:
    """Handle of a running standalone metrics server; ``close()`` stops it."""

    def __init__(self, server: _Server, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        host, port = server.server_address[:2]
        self.addr: str = str(host)
        self.port: int = int(port)

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving, release the port and join the thread (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def start_metrics_server(
    port: int = 9464,
    addr: str = "127.0.0.1",
    registry: Collector | None = None,
    *,
    gzip: bool = True,
    polite: bool = True,
) -> MetricsServer:
    """Serve ``/metrics`` on ``addr:port`` from a daemon thread; ``port=0`` picks a free one.

    Binds to ``127.0.0.1`` unless told otherwise: exposing metrics beyond the host is a
    decision. Same negotiation, gzip and registry resolution as :class:`MetricsApp`.
    """
    server_class = _Server6 if ":" in addr else _Server
    server = server_class((addr, port), _Handler)
    server.registry = registry
    server.gzip = gzip
    server.polite = polite
    thread = threading.Thread(
        target=server.serve_forever, name="taskscope-metrics-server", daemon=True
    )
    thread.start()
    return MetricsServer(server, thread)
