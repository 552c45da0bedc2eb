"""``taskscope demo``: serve the demo app, drive it, show what taskscope sees."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from taskscope.demo.load import LoadStats
    from taskscope.demo.stats import DemoEvents, Snapshot
    from taskscope.demo.view import Frame

WINDOW = 10.0
"""Seconds of history behind the live numbers."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration", type=float, default=60.0, metavar="SECONDS",
        help="stop after this many seconds; 0 runs until Ctrl-C (default: 60)",
    )  # fmt: skip
    parser.add_argument(
        "--port", type=int, default=8000, help="port to serve on; 0: any free one (default: 8000)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1",
        help="address to serve on (default: 127.0.0.1; 0.0.0.0 lets Prometheus in Docker scrape)",
    )  # fmt: skip
    parser.add_argument(
        "--rate", type=float, default=20.0,
        help="notification requests per second from the built-in load generator, on top of "
        "a burst of 6 report exports every 2 s and a thumbnail per second (default: 20)",
    )  # fmt: skip
    parser.add_argument(
        "--no-load", action="store_true", help="serve only; send requests yourself (curl, wrk)"
    )
    parser.add_argument(
        "--svg", default=None, metavar="PATH",
        help="also save the final view, as the live view draws it, to an SVG file",
    )  # fmt: skip
    parser.add_argument(
        "--scale-out", action="store_true",
        help="move the report task to a Celery worker: starts redis-server and a worker as "
        "child processes (needs redis-server and taskscope[celery])",
    )  # fmt: skip
    parser.add_argument(
        "--broker", default=None, metavar="URL",
        help="with --scale-out: publish to this running broker instead (start the worker "
        "yourself: celery -A taskscope.demo.worker worker)",
    )  # fmt: skip
    parser.add_argument(
        "--interval", type=float, default=None, metavar="SECONDS",
        help="refresh every SECONDS (default: 1 on a terminal, 5 otherwise)",
    )  # fmt: skip


class _Stop(Exception):  # noqa: N818 - a signal, not an error
    """SIGTERM: stop like Ctrl-C."""


def _raise_stop(signum: int, _frame: Any) -> None:
    raise _Stop


class Session:
    """One demo run: the registry, the recorded events, the history behind the view."""

    def __init__(
        self,
        registry: CollectorRegistry,
        events: DemoEvents,
        load: LoadStats | None,
        url: str,
        otlp_endpoint: str = "",
    ) -> None:
        from taskscope.demo.stats import take_snapshot

        self.registry = registry
        self.events = events
        self.load = load
        self.url = url
        self.otlp_endpoint = otlp_endpoint
        self.started = time.monotonic()
        self.history: deque[Snapshot] = deque([take_snapshot(registry)])

    def frame(self, title: str, footer: str = "", *, whole_run: bool = False) -> Frame:
        """Numbers over the last ``WINDOW`` seconds (or the whole run) and the findings."""
        from taskscope.demo.app import DEMO_THREADS
        from taskscope.demo.stats import take_snapshot, window
        from taskscope.demo.view import Frame, findings

        now = take_snapshot(self.registry)
        self.history.append(now)
        while len(self.history) > 2 and now.at - self.history[1].at >= WINDOW:
            self.history.popleft()
        total = window(now, None)
        elapsed = now.at - self.started
        total.seconds = elapsed
        for task in total.tasks:
            task.seconds = elapsed
        shown = total if whole_run else window(now, self.history[0])
        if not whole_run:
            title = f"{title} (last {shown.seconds:.0f} s)"
        found = findings(total, self.events, DEMO_THREADS)
        otlp = ""
        if self.otlp_endpoint:
            failed = sum(
                value
                for (name, _), value in now.counters.items()
                if name == "taskscope_otlp_export_failures_total"
            )
            otlp = (
                f"OTLP to {self.otlp_endpoint}: {failed:.0f} failed exports "
                "(taskscope_otlp_export_failures_total; SDK error logs muted)"
            )
        metrics = f"{self.url}/metrics"
        return Frame(title, shown, self.events, self.load, metrics, found, footer, otlp)


def run(args: argparse.Namespace) -> int:
    """``taskscope demo``; returns the exit status."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
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
    from taskscope.demo.fit import terminal_width
    from taskscope.demo.load import LoadStats, run_load
    from taskscope.demo.server import DemoServer, Otlp, bind, client_host
    from taskscope.demo.stats import DemoEvents, QuietLogger
    from taskscope.demo.view import plain

    interactive = sys.stdout.isatty() and not os.environ.get("CI")
    try:
        import rich  # noqa: F401
    except ImportError:
        interactive = False
    interval = args.interval or (1.0 if interactive else 5.0)

    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        print("pick another port with --port (0: any free port)", file=sys.stderr)
        return 1
    port = sock.getsockname()[1]
    local = client_host(args.host)  # 0.0.0.0 is not an address to browse to
    url = f"http://{f'[{local}]' if ':' in local else local}:{port}"

    registry = CollectorRegistry()  # the demo's own, not the process registry
    otlp = Otlp.from_env(registry)
    events = DemoEvents()
    telemetry = Telemetry(
        registry=registry,
        logger=QuietLogger(),
        sinks=[events],
        tracer_provider=otlp.tracer_provider,
        meter_provider=otlp.meter_provider,
        otel_metrics=otlp.meter_provider is not None,
        span_mode="child" if otlp.tracer_provider is not None else "off",
        hung_after=demo_app.DEMO_HUNG_AFTER,
    )
    demo_app.LOG_FILE.write_text("")
    scale = None
    if args.scale_out or args.broker:
        from taskscope.demo.scaleout import ScaleOutError, start_scale_out

        try:
            scale = start_scale_out(args.broker, telemetry)
        except ScaleOutError as exc:
            print(exc, file=sys.stderr)
            sock.close()
            otlp.shutdown()
            return 1
    app = demo_app.create_app(
        telemetry,
        demo_app.metrics_app_for(registry),
        report_task=scale.report_task if scale is not None else None,
    )
    server = DemoServer(app, sock)
    if not server.start():
        print("the demo server did not start (see the errors above)", file=sys.stderr)
        sock.close()
        otlp.shutdown()
        if scale is not None:
            scale.stop()
        return 1

    if otlp.handle is not None:  # the view shows the failure counter instead of log spam
        logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
    load = None if args.no_load else LoadStats()
    session = Session(registry, events, load, url, otlp.endpoint)
    stop_load = threading.Event()
    end = session.started + args.duration if args.duration > 0 else None
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    how = "finished"
    load_thread = threading.Thread(
        target=lambda: load and asyncio.run(run_load(local, port, args.rate, stop_load, load)),
        name="demo-load",
        daemon=True,
    )
    try:
        print(_hints(url, args.host, port, otlp.note), flush=True)
        if scale is not None:
            print(scale.note, flush=True)
        load_thread.start()
        if interactive:
            _live(session, interval, end)
        else:
            _periodic(session, interval, end)
    except KeyboardInterrupt:
        how = "stopped by Ctrl-C"
    except _Stop:
        how = "stopped by SIGTERM"
    finally:
        stop_load.set()
        _join(load_thread, 6)
        app.state.partner.close()  # the dead upstream hangs up: the hung task ends
        server.stop()
        if scale is not None:
            scale.stop()
        otlp.shutdown()
        signal.signal(signal.SIGTERM, previous)

    elapsed = time.monotonic() - session.started
    footer = (
        "(quantiles are estimated from the histogram buckets, as histogram_quantile() does)\n"
        f"uvicorn tracebacks of failed background tasks hidden by the demo: "
        f"{server.quiet.hidden}\n"
        f"metrics were at {url}/metrics; the tutorial's log file: {demo_app.LOG_FILE}"
    )
    title = f"taskscope demo: final summary ({how} after {elapsed:.1f} s, whole run)"
    summary = session.frame(title, footer, whole_run=True)
    print(plain(summary, final=True, width=terminal_width()), flush=True)
    if args.svg:
        _save_svg(args.svg, session.frame(f"background tasks ({elapsed:.0f} s)", whole_run=True))
    return 0


def _save_svg(path: str, frame: Any) -> None:
    """Draw the live view of ``frame`` into an SVG file (rich's own export)."""
    import io

    from rich.console import Console

    from taskscope.demo.view import rich_view

    console = Console(record=True, width=100, file=io.StringIO(), force_terminal=True)
    console.print(rich_view(frame))
    console.save_svg(path, title="taskscope demo")


def _join(thread: threading.Thread, timeout: float) -> None:
    """Join a started thread; a second Ctrl-C meanwhile just stops waiting."""
    if thread.ident is not None:
        with contextlib.suppress(KeyboardInterrupt):
            thread.join(timeout)


def _hints(url: str, host: str, port: int, note: str) -> str:
    local = url.removeprefix("http://").rsplit(":", 1)[0].strip("[]")
    listening = f" (listening on {host})" if host != local else ""
    target = f"{local}:{port}"
    lines = [
        f"taskscope demo serving {url}{listening}  (POST /send-notification/{{email}}, "  # noqa: ISC003
        + "/reports/{id}, /thumbnails/{id})",
        f"metrics: {url}/metrics  (Prometheus text format; OpenMetrics with exemplars)",
        "Prometheus + Grafana + Tempo with taskscope's dashboard and alerts, on their own "  # noqa: ISC003
        + "copy of this demo: docker compose -f deploy/docker-compose.yml up --build",
        "your own Prometheus: add to prometheus.yml under scrape_configs: "  # noqa: ISC003
        + f"{{job_name: taskscope-demo, static_configs: [{{targets: ['{target}']}}]}}",
    ]
    if note:
        lines.append(note)
    return "\n".join(lines)


def _left(end: float | None) -> str:
    if end is None:
        return "Ctrl-C to stop"
    return f"{max(0.0, end - time.monotonic()):.0f} s left; Ctrl-C to stop"


def _live(session: Session, interval: float, end: float | None) -> None:
    from rich.console import Console
    from rich.live import Live

    from taskscope.demo.view import rich_view

    console = Console()

    def render() -> Any:  # sized at each refresh: the terminal may have been resized
        width, height = console.size
        return rich_view(session.frame("background tasks", _left(end)), width, height)

    with Live(render(), console=console, auto_refresh=False, transient=False) as live:
        while end is None or time.monotonic() < end:
            pause = interval if end is None else min(interval, max(0.0, end - time.monotonic()))
            time.sleep(pause)
            live.update(render(), refresh=True)


def _periodic(session: Session, interval: float, end: float | None) -> None:
    from taskscope.demo.fit import terminal_width
    from taskscope.demo.view import plain

    while True:
        if end is not None and time.monotonic() + interval >= end:
            time.sleep(max(0.0, end - time.monotonic()))
            return
        time.sleep(interval)
        elapsed = time.monotonic() - session.started
        frame = session.frame(f"[{elapsed:.0f} s] background tasks")
        print(plain(frame, width=terminal_width()), end="\n\n", flush=True)
