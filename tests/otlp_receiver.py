"""A tiny OTLP/HTTP collector for tests: decodes what the real exporter sends.

``OtlpReceiver(mode=...)``: ``"ok"`` answers 200, ``"unavailable"`` answers 503,
``"hang"`` reads the request and never replies (until the receiver closes, or
``hang_limit`` seconds pass, so no test can hang forever).
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

Mode = Literal["ok", "unavailable", "hang"]


@dataclass
class Received:
    """One decoded export request."""

    path: str
    headers: dict[str, str]
    message: Any


@dataclass
class _State:
    mode: Mode
    hang_limit: float
    release: threading.Event = field(default_factory=threading.Event)
    traces: list[Received] = field(default_factory=list)
    metrics: list[Received] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: _State


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        state = self.server.state
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        encoding = self.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        headers = {k.lower(): v for k, v in self.headers.items()}
        if "traces" in self.path:
            message: Any = ExportTraceServiceRequest.FromString(body)
            store, reply = state.traces, ExportTraceServiceResponse()
        elif "metrics" in self.path:
            message = ExportMetricsServiceRequest.FromString(body)
            store, reply = state.metrics, ExportMetricsServiceResponse()
        else:
            self._answer(404, b"")
            return
        with state.changed:
            store.append(Received(self.path, headers, message))
            state.changed.notify_all()
        if state.mode == "hang":
            state.release.wait(state.hang_limit)
            self.close_connection = True
            return
        if state.mode == "unavailable":
            self._answer(503, b"unavailable")
            return
        self._answer(200, reply.SerializeToString(), "application/x-protobuf")

    def _answer(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


class OtlpReceiver:
    """Listens on 127.0.0.1:<free port>; ``endpoint`` is the base URL for the exporter."""

    def __init__(self, mode: Mode = "ok", *, hang_limit: float = 30.0) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = _State(mode, hang_limit)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.port = int(self._server.server_address[1])
        self.endpoint = f"http://127.0.0.1:{self.port}"

    @property
    def traces(self) -> list[Received]:
        with self._server.state.changed:
            return list(self._server.state.traces)

    @property
    def metrics(self) -> list[Received]:
        with self._server.state.changed:
            return list(self._server.state.metrics)

    def spans(self) -> Iterator[tuple[dict[str, Any], Any]]:
        """(resource attributes, span) for every span received."""
        for received in self.traces:
            for resource_spans in received.message.resource_spans:
                resource = attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        yield resource, span

    def metric_points(self, name: str) -> list[tuple[Any, Any]]:
        """(metric, data point) for every point of metric ``name``, in arrival order."""
        found: list[tuple[Any, Any]] = []
        for received in self.metrics:
            for resource_metrics in received.message.resource_metrics:
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        if metric.name != name:
                            continue
                        kind = metric.WhichOneof("data")
                        for point in getattr(metric, kind).data_points:
                            found.append((metric, point))
        return found

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate()`` holds after a request arrived (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        state = self._server.state
        with state.changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                state.changed.wait(remaining)
        return True

    def start(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def close(self) -> None:
        """Release hung requests, stop serving, free the port."""
        self._server.state.release.set()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def attributes(items: Any) -> dict[str, Any]:
    """OTLP ``KeyValue`` list -> plain dict."""
    result: dict[str, Any] = {}
    for item in items:
        value = item.value
        kind = value.WhichOneof("value")
        result[item.key] = getattr(value, kind) if kind else None
    return result
