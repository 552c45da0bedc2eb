"""Run as a script: importing and using taskscope (drop-in, instrument_app, loop probe,
metrics server, OTLP setup and shutdown) leaves every signal handler as it was.
Prints one JSON line: the handlers before and after."""

from __future__ import annotations

import json
import signal
import sys


def handlers() -> dict[str, str]:
    result = {}
    for number in sorted(signal.valid_signals()):
        try:
            result[str(int(number))] = repr(signal.getsignal(number))
        except (OSError, ValueError):
            continue
    return result


before = handlers()
wakeup_before = signal.set_wakeup_fd(-1)

from prometheus_client import CollectorRegistry  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import Response  # noqa: E402
from starlette.routing import Route  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

import taskscope  # noqa: E402
from taskscope import BackgroundTasks, instrument_app  # noqa: E402
from taskscope.exposition import MetricsApp, start_metrics_server  # noqa: E402
from taskscope.otlp import setup_otlp  # noqa: E402


async def on_loop() -> None:
    pass


def in_thread() -> None:
    pass


def failing() -> None:
    raise RuntimeError("boom")


async def endpoint(request: Request) -> Response:
    tasks = BackgroundTasks()
    tasks.add_task(on_loop)
    tasks.add_task(in_thread)
    tasks.add_task(failing)
    return Response("ok", background=tasks)


registry = CollectorRegistry()
otlp = setup_otlp(endpoint="http://127.0.0.1:9", registry=registry, shutdown_timeout=1.0)
app = Starlette(routes=[Route("/", endpoint), Route("/metrics", MetricsApp(registry))])
instrument_app(app, otlp.telemetry(registry=registry))
with TestClient(app, raise_server_exceptions=False) as client:
    for _ in range(3):
        client.get("/")
    client.get("/metrics")
server = start_metrics_server(port=0, registry=registry)
server.close()
otlp.shutdown()
taskscope.uninstrument()

print(
    "SIGNALS "
    + json.dumps(
        {
            "before": before,
            "after": handlers(),
            "wakeup_fd": [wakeup_before, signal.set_wakeup_fd(-1)],
        }
    ),
    flush=True,
)
sys.exit(0)
