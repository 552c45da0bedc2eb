"""``taskscope demo``: serve the demo app, drive it, show what taskscope sees."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from typing import Any

STOP_GRACE = 3
"""Seconds background tasks get to finish at shutdown before they are cancelled."""
WINDOW = 10.0
"""Seconds of history behind the live numbers."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration", type=float, default=60.0, metavar="SECONDS",
        help="stop after this many seconds; 0 runs until Ctrl-C (default: 60)",
    )  # fmt: skip
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=8000,
        help="port to serve on; 0 picks a free one (default: 8000)",
    )
    parser.add_argument(
        "--rate", type=float, default=20.0,
        help="notification requests per second sent by the built-in load generator, on top of "
        "a burst of report exports every 2 s and a thumbnail per second (default: 20)",
    )  # fmt: skip
    parser.add_argument(
        "--no-load", action="store_true", help="serve only; send requests yourself (curl, wrk)"
    )
    parser.add_argument(
        "--interval", type=float, default=None, metavar="SECONDS",
        help="refresh every SECONDS (default: 1 on a terminal, 5 otherwise)",
    )  # fmt: skip


class _Stop(Exception):  # noqa: N818 - a signal, not an error
    pass


class _QuietTaskTracebacks(logging.Filter):
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


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        print(f"taskscope demo needs the demo extra ({exc.name} is missing):", file=sys.stderr)
        print("    pip install 'taskscope[demo]'", file=sys.stderr)
        return 1
    if args.rate <= 0 or args.duration < 0 or (args.interval is not None and args.interval <= 0):
        print("--rate and --interval must be positive, --duration at least 0", file=sys.stderr)
        return 2
    from prometheus_client import CollectorRegistry

    from taskscope import Telemetry
    from taskscope.demo import app as demo_app
    from taskscope.demo.load import LoadStats, run_load
    from taskscope.demo.stats import EventLog, take_snapshot

    interactive = sys.stdout.isatty() and not os.environ.get("CI")
    try:
        import rich  # noqa: F401
    except ImportError:
        interactive = False
    interval = args.interval or (1.0 if interactive else 5.0)

    try:
        sock = _bind(args.host, args.port)
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        print("pick another port with --port (0: any free port)", file=sys.stderr)
        return 1
    port = sock.getsockname()[1]
    url_host = f"[{args.host}]" if ":" in args.host else args.host
    base_url = f"http://{url_host}:{port}"
    client_host = _client_host(args.host)

    otlp = _setup_otlp()
    registry = CollectorRegistry()
    events = EventLog()
    telemetry = Telemetry(
        registry=registry,
        logger=events,
        tracer_provider=otlp.get("tracer_provider"),
        meter_provider=otlp.get("meter_provider"),
        otel_metrics=otlp.get("meter_provider") is not None,
        span_mode="child" if otlp.get("tracer_provider") is not None else "off",
    )
    demo_app.LOG_FILE.write_text("")
    app = demo_app.create_app(telemetry, demo_app.metrics_app_for(registry))

    quiet = _QuietTaskTracebacks()
    uvicorn_logger = logging.getLogger("uvicorn")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(quiet)
    uvicorn_logger.addHandler(handler)
    uvicorn_logger.setLevel(logging.WARNING)
    uvicorn_logger.propagate = False
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=STOP_GRACE,
    )
    server = uvicorn.Server(config)
    server_thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="demo-server", daemon=True
    )
    server_thread.start()
    deadline = time.monotonic() + 15
    while not server.started and server_thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        print("the demo server did not start (see the errors above)", file=sys.stderr)
        return 1

    hints = [
        (
            f"taskscope demo serving {base_url}  (POST /send-notification/{{email}}, "
            "/reports/{id}, /thumbnails/{id})"
        ),
        f"metrics: {base_url}/metrics  (Prometheus text format; scrape it)",
        (
            "Prometheus + Grafana with the taskscope dashboard: "
            "docker compose -f deploy/docker-compose.yml up"
        ),
        "  (the containers reach the demo only if it listens beyond 127.0.0.1: --host 0.0.0.0)",
    ]
    if otlp.get("note"):
        hints.append(str(otlp["note"]))
    print("\n".join(hints), flush=True)

    load = None if args.no_load else LoadStats()
    stop_load = threading.Event()
    load_thread = None
    if load is not None:
        load_thread = threading.Thread(
            target=asyncio.run,
            args=(run_load(client_host, port, args.rate, stop_load, load),),
            name="demo-load",
            daemon=True,
        )
        load_thread.start()

    started = time.monotonic()
    first = take_snapshot(registry)
    history = deque([first])
    end = started + args.duration if args.duration > 0 else None

    def frame(title: str, earlier: Any, footer: str = "") -> Any:
        from taskscope.demo.stats import window
        from taskscope.demo.view import Frame

        now = take_snapshot(registry)
        history.append(now)
        while len(history) > 2 and now.at - history[1].at >= WINDOW:
            history.popleft()
        win = window(now, history[0] if earlier is None else earlier)
        title = f"{title} (last {win.seconds:.0f} s)"
        return Frame(title, win, events, load, f"{base_url}/metrics", footer)

    def left() -> str:
        if end is None:
            return "Ctrl-C to stop"
        return f"{max(0.0, end - time.monotonic()):.0f} s left, Ctrl-C to stop"

    previous = signal.signal(signal.SIGTERM, _raise_stop)
    interrupted = False
    try:
        if interactive:
            _live(frame, interval, end, left)
        else:
            _periodic(frame, interval, end)
    except (KeyboardInterrupt, _Stop):
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_load.set()
        if load_thread is not None:
            load_thread.join(timeout=6)
        server.should_exit = True
        server_thread.join(timeout=STOP_GRACE + 5)
        _shutdown_otlp(otlp)

    from taskscope.demo.stats import window
    from taskscope.demo.view import Frame, plain

    elapsed = time.monotonic() - started
    total = window(take_snapshot(registry), None)
    total.seconds = elapsed
    for task in total.tasks:
        task.seconds = elapsed
    how = "stopped by Ctrl-C" if interrupted else "finished"
    footer = (
        f"uvicorn tracebacks of failed background tasks hidden by the demo: {quiet.hidden}\n"
        f"metrics were at {base_url}/metrics; the log file was {demo_app.LOG_FILE}"
    )
    title = f"taskscope demo: final summary ({how} after {elapsed:.1f} s, whole run)"
    result = Frame(title, total, events, load, f"{base_url}/metrics", footer)
    print(plain(result, rate=False, threads=demo_app.DEMO_THREADS, final=True), flush=True)
    return 0


def _live(frame: Any, interval: float, end: float | None, left: Any) -> None:
    from rich.console import Console
    from rich.live import Live

    from taskscope.demo.app import DEMO_THREADS
    from taskscope.demo.view import rich_view

    console = Console()

    def render() -> Any:
        return rich_view(frame("background tasks", None, left()), DEMO_THREADS)

    with Live(render(), console=console, auto_refresh=False, transient=False) as live:
        while end is None or time.monotonic() < end:
            time.sleep(min(interval, max(0.0, end - time.monotonic())) if end else interval)
            live.update(render(), refresh=True)


def _periodic(frame: Any, interval: float, end: float | None) -> None:
    from taskscope.demo.view import plain

    started = time.monotonic()
    while True:
        wake = time.monotonic() + interval
        if end is not None and wake >= end:
            time.sleep(max(0.0, end - time.monotonic()))
            return
        time.sleep(interval)
        elapsed = time.monotonic() - started
        print(plain(frame(f"[{elapsed:.0f} s] background tasks", None)))
        print(flush=True)


def _raise_stop(signum: int, _frame: Any) -> None:
    raise _Stop


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _client_host(host: str) -> str:
    """Where the load generator connects: the demo's own address, never elsewhere."""
    if host in ("", "0.0.0.0"):  # noqa: S104 - connecting, not binding
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _setup_otlp() -> dict[str, Any]:
    """OTLP export when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (via taskscope.otlp)."""
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint:
        return {}
    try:
        from taskscope.otlp import setup_otlp_from_env  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        return {
            "note": f"OTEL_EXPORTER_OTLP_ENDPOINT is set but OTLP export is unavailable ({exc})"
        }
    try:
        result = setup_otlp_from_env()
    except Exception as exc:
        return {"note": f"OTLP export not started: {type(exc).__name__}: {exc}"}
    found: dict[str, Any] = {
        "otlp": result,
        "note": f"OTLP: exporting spans and metrics to {endpoint}",
    }
    if isinstance(result, tuple) and len(result) >= 2:
        found["tracer_provider"], found["meter_provider"] = result[0], result[1]
    else:
        found["tracer_provider"] = getattr(result, "tracer_provider", None)
        found["meter_provider"] = getattr(result, "meter_provider", None)
    return found


def _shutdown_otlp(otlp: dict[str, Any]) -> None:
    """Flush and stop the exporters, bounded: a dead collector must not hang the exit."""
    owner = otlp.get("otlp")
    targets: list[Any] = [owner] if hasattr(owner, "shutdown") else []
    if not targets:
        targets = [otlp[k] for k in ("tracer_provider", "meter_provider") if otlp.get(k)]
    if not targets:
        return

    def shutdown() -> None:
        for target in targets:
            with contextlib.suppress(Exception):  # best effort at exit
                target.shutdown()

    thread = threading.Thread(target=shutdown, name="demo-otlp-shutdown", daemon=True)
    thread.start()
    thread.join(timeout=5)
