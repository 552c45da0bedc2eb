"""Collector endpoints for the OTLP fault rows that ``tests/otlp_receiver.py`` does not have:
a slow one (answers 200 after a delay) and a closed one (nothing listens)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.reliability.harness import free_port


class _SlowServer(ThreadingHTTPServer):
    daemon_threads = True
    delay: float
    requests: int


class _SlowHandler(BaseHTTPRequestHandler):
    server: _SlowServer
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.requests += 1
        time.sleep(self.server.delay)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")  # an empty Export*ServiceResponse
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


class SlowCollector:
    """Accepts every export and answers 200 after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self._server = _SlowServer(("127.0.0.1", 0), _SlowHandler)
        self._server.delay = delay
        self._server.requests = 0
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def requests(self) -> int:
        return self._server.requests

    def __enter__(self) -> SlowCollector:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class ClosedCollector:
    """An endpoint where nothing listens (connection refused)."""

    def __init__(self) -> None:
        self.endpoint = f"http://127.0.0.1:{free_port()}"
        self.requests = 0

    def __enter__(self) -> ClosedCollector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass
