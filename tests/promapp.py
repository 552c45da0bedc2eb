"""The small app that the real-Prometheus end-to-end test scrapes (run in a subprocess).

``main()`` (with ``--fd N``) serves it with uvicorn on an already bound, inherited listening
socket (no port race). Every endpoint adds background tasks that produce one kind
of signal; ``ROUND`` lists the requests of one workload round and ``TASKS_PER_ROUND`` how
many task outcomes one round records.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from taskscope import BackgroundTasks, Telemetry, start_loop_probe
from taskscope.exposition import MetricsApp
from taskscope.otlp import setup_otlp

# (path, task outcomes it records); the e2e test drives these, in order, once per round.
ROUND: tuple[tuple[str, int], ...] = (
    ("/ok", 3),
    ("/fail/value", 2),
    ("/fail/key", 2),
    ("/block", 1),
    ("/ok", 3),
)
TASKS_PER_ROUND = sum(n for _, n in ROUND)
BLOCK_SECONDS = 0.15


async def async_ok() -> None:
    await asyncio.sleep(0.01)


def sync_ok() -> None:
    time.sleep(0.005)


async def _never_awaited() -> None:  # pragma: no cover - closed unawaited on purpose
    return None


def sync_returning_coroutine() -> Coroutine[Any, Any, None]:
    """A misuse taskscope flags: a sync callable whose coroutine would never run."""
    return _never_awaited()


async def async_fails() -> None:
    await asyncio.sleep(0)
    raise ValueError("bad value")


def sync_fails() -> None:
    raise KeyError("missing")


async def after_failure() -> None:  # pragma: no cover - always skipped
    return None


async def blocks_the_loop() -> None:
    await asyncio.sleep(0)
    time.sleep(BLOCK_SECONDS)  # the point: a loop block to detect


# The first-occurrence workload: /first/warmup runs these tasks cleanly (taskscope sees
# their names, the alerting counters start at 0); /first/trigger then makes each one
# fail, be skipped, block the loop or misuse a coroutine for the first time.
async def first_flaky(*, fail: bool) -> None:
    await asyncio.sleep(0)
    if fail:
        raise ValueError("first failure")


async def first_skippable() -> None:
    await asyncio.sleep(0)


async def first_blocker(*, block: bool) -> None:
    await asyncio.sleep(0)
    if block:
        time.sleep(BLOCK_SECONDS)


def first_misuser(*, misuse: bool) -> Coroutine[Any, Any, None] | None:
    return _never_awaited() if misuse else None


async def first_warmup(request: Request) -> PlainTextResponse:
    tasks = BackgroundTasks(telemetry=request.app.state.telemetry)
    tasks.add_task(first_blocker, block=False)
    tasks.add_task(first_misuser, misuse=False)
    tasks.add_task(first_flaky, fail=False)
    tasks.add_task(first_skippable)
    return PlainTextResponse("ok", background=tasks)


async def first_trigger(request: Request) -> PlainTextResponse:
    tasks = BackgroundTasks(telemetry=request.app.state.telemetry)
    tasks.add_task(first_blocker, block=True)
    tasks.add_task(first_misuser, misuse=True)
    tasks.add_task(first_flaky, fail=True)
    tasks.add_task(first_skippable)  # skipped: the task before it failed
    return PlainTextResponse("ok", background=tasks)


def build_app(telemetry: Telemetry, metrics_app: Any) -> Starlette:
    """The app: one endpoint per workload shape, plus ``/metrics`` (taskscope's exposition)."""

    def endpoint(*funcs: Callable[[], Any]) -> Callable[[Request], Any]:
        async def handler(request: Request) -> PlainTextResponse:
            tasks = BackgroundTasks(telemetry=telemetry)
            for func in funcs:
                tasks.add_task(func)
            return PlainTextResponse("ok", background=tasks)

        return handler

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await start_loop_probe(telemetry)  # lag samples from the start, not the first task
        yield

    app = Starlette(
        routes=[
            Route("/ok", endpoint(async_ok, sync_ok, sync_returning_coroutine)),
            Route("/fail/value", endpoint(async_fails, after_failure)),
            Route("/fail/key", endpoint(sync_fails, after_failure)),
            Route("/block", endpoint(blocks_the_loop)),
            Route("/first/warmup", first_warmup),
            Route("/first/trigger", first_trigger),
            Route("/metrics", metrics_app),
        ],
        lifespan=lifespan,
    )
    app.state.telemetry = telemetry
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True, help="inherited listening socket")
    parser.add_argument(
        "--otlp-endpoint", required=True, help="OTLP/HTTP base URL (the test gives a dead one)"
    )
    args = parser.parse_args()

    import uvicorn

    registry = CollectorRegistry()
    # Real SDK providers: trace ids for the exemplars, and OTLP export that fails against
    # the dead endpoint, so the loss counters (taskscope_otlp_*) move as in an outage.
    otlp = setup_otlp(
        endpoint=args.otlp_endpoint,
        registry=registry,
        export_timeout=0.5,
        export_interval=1.0,
        schedule_delay=0.2,
        shutdown_timeout=1.0,
    )
    telemetry = otlp.telemetry(block_threshold=0.1, lag_interval=0.05, loop_probe=True)
    app = build_app(telemetry, MetricsApp(registry=registry))
    sock = socket.socket(fileno=args.fd)
    config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        otlp.shutdown()


if __name__ == "__main__":
    main()
