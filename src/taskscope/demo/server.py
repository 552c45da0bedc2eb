"""Serving the demo: uvicorn in a thread on a socket bound up front, OTLP if configured."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

STOP_GRACE = 3
"""Seconds background tasks get to finish at shutdown before uvicorn cancels them."""


def bind(host: str, port: int) -> socket.socket:
    """Listen now, so a busy port is a clear message, not a traceback from a thread."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def client_host(host: str) -> str:
    """Where the load generator connects: the demo's own address, never elsewhere."""
    if host in ("", "0.0.0.0"):  # noqa: S104 - connecting, not binding
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


class QuietTaskTracebacks(logging.Filter):
    """uvicorn logs a traceback for every failed background task: the demo counts them."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = 0

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, BaseExceptionGroup):
            errors: list[BaseException] = list(error.exceptions)
        else:
            errors = [error] if error is not None else []
        if errors and all(isinstance(e, ConnectionError | TimeoutError) for e in errors):
            self.hidden += 1
            return False
        # At shutdown uvicorn cancels what still runs: the summary shows it.
        return "timeout graceful shutdown exceeded" not in record.getMessage()


class DemoServer:
    """uvicorn serving ``app`` on ``sock`` from a daemon thread (the main thread draws)."""

    def __init__(self, app: Any, sock: socket.socket) -> None:
        import uvicorn

        self.quiet = QuietTaskTracebacks()
        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(self.quiet)
        uvicorn_logger = logging.getLogger("uvicorn")
        uvicorn_logger.addHandler(handler)
        uvicorn_logger.setLevel(logging.WARNING)
        uvicorn_logger.propagate = False
        config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="on",
            timeout_graceful_shutdown=STOP_GRACE,
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="demo-server", daemon=True
        )

    def start(self, timeout: float = 15.0) -> bool:
        """Start serving; False if the app did not start (errors were logged)."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self.thread.is_alive():
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        return bool(self.server.started)

    def stop(self) -> None:
        """Graceful stop, bounded; a second Ctrl-C meanwhile stops at once."""
        self.server.should_exit = True
        try:
            self.thread.join(timeout=STOP_GRACE + 5)
        except KeyboardInterrupt:
            self.server.force_exit = True
            self.thread.join(timeout=2)


@dataclass
class Otlp:
    """OTLP export set up by ``taskscope.otlp`` when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set."""

    tracer_provider: Any = None
    meter_provider: Any = None
    handle: Any = None
    note: str = ""
    endpoint: str = ""

    @classmethod
    def from_env(cls, registry: Any) -> Otlp:
        """Loss counters of the exporters go to ``registry`` (the demo's /metrics)."""
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if not endpoint:
            return cls()
        try:
            from taskscope.otlp import setup_otlp_from_env

            handle = setup_otlp_from_env(registry=registry)
        except ImportError as exc:
            return cls(note=f"OTEL_EXPORTER_OTLP_ENDPOINT is set; OTLP unavailable: {exc}")
        except Exception as exc:
            return cls(note=f"OTLP export not started: {type(exc).__name__}: {exc}")
        note = f"OTLP: exporting spans and metrics to {endpoint}"
        return cls(handle.tracer_provider, handle.meter_provider, handle, note, endpoint)

    def shutdown(self) -> None:
        """Flush and stop the exporters (bounded by taskscope.otlp: a dead collector is fine)."""
        if self.handle is not None:
            with contextlib.suppress(Exception):  # best effort at exit
                self.handle.shutdown()
