"""The app the reliability tests run under a real uvicorn process (never imported by pytest).

Configured through environment variables (read when uvicorn imports this module):

- ``TS_CONTINUE_ON_ERROR=1``: ``Telemetry(continue_on_error=True)``.
- ``TS_FINAL=/path/prefix``: write the final state (JSON: outcomes, series, the registry text)
  to ``prefix.lifespan.json`` at lifespan shutdown and ``prefix.atexit.json`` at exit.
- ``TS_OTLP_ENDPOINT=http://127.0.0.1:PORT``: export spans and metrics through
  ``taskscope.otlp.setup_otlp`` (short timeouts); otherwise no OTel SDK at all.
- ``TS_METRICS=1``: mount ``/metrics``.
- ``TS_BASEHTTP=N``: stack N pass-through ``BaseHTTPMiddleware`` layers.
- ``TS_FASTAPI=1``: a FastAPI app; ``/work`` takes a ``BackgroundTasks`` parameter (the
  object FastAPI builds) and the settings come from ``instrument_app``.

Endpoints: ``/work`` (a planned mix of async/sync, some failing), ``/hold`` (long tasks with
tasks queued behind them), ``/stream`` (streaming response with a background task),
``/names`` (a task whose function is generated per request), ``/stats`` (JSON read from
the registry: outcomes, loop lag, RSS, threads, fds, series).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

# Registered before taskscope creates its runtime: atexit runs hooks last-in first-out, so
# this one runs after taskscope's (which records in-flight tasks as abandoned).
_FINAL = os.environ.get("TS_FINAL", "")
_state: dict[str, Any] = {}


def _write_final(tag: str) -> None:
    if _FINAL and _state:
        Path(f"{_FINAL}.{tag}.json").write_text(json.dumps(snapshot(final=True)))


atexit.register(_write_final, "atexit")

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from taskscope import BackgroundTasks, Telemetry  # noqa: E402
from taskscope._record import OUTSIDE_TASKS  # noqa: E402

registry = CollectorRegistry()
_otlp: Any = None
_options: dict[str, Any] = {}
if os.environ.get("TS_OTLP_ENDPOINT"):
    from taskscope.otlp import setup_otlp

    _otlp = setup_otlp(
        endpoint=os.environ["TS_OTLP_ENDPOINT"],
        registry=registry,
        service_name="reliability",
        export_interval=float(os.environ.get("TS_OTLP_INTERVAL", "1")),
        schedule_delay=0.5,
    )
    _options = {"tracer_provider": _otlp.tracer_provider, "meter_provider": _otlp.meter_provider}
else:
    _options = {"otel_metrics": False}

telemetry = Telemetry(
    registry=registry,
    continue_on_error=os.environ.get("TS_CONTINUE_ON_ERROR") == "1",
    **_options,
)

_plan_lock = threading.Lock()
_plan_index = 0
added = 0
expected: Counter[str] = Counter()
started: Counter[str] = Counter()
lags: deque[float] = deque(maxlen=200_000)
rss_samples: list[int] = []


class PlannedError(RuntimeError):
    """The failure the plan asks for."""


async def work_async(i: int, fail: bool) -> None:
    await asyncio.sleep(0)
    if fail:
        raise PlannedError(f"planned failure {i}")


def work_sync(i: int, fail: bool) -> None:
    time.sleep(0.0002)
    if fail:
        raise PlannedError(f"planned failure {i}")


def _plan(n: int, fail_every: int) -> list[tuple[bool, bool]]:
    """``n`` tasks (sync?, fail?) from a global sequence: alternating kinds, every
    ``fail_every``-th task fails. Records the outcomes they must end with."""
    global _plan_index, added
    with _plan_lock:
        start = _plan_index
        _plan_index += n
        added += n
        plan = [
            (k % 2 == 1, fail_every > 0 and k % fail_every == fail_every - 1)
            for k in range(start, start + n)
        ]
        stopped = False
        for _sync, fail in plan:
            if stopped:
                expected["skipped"] += 1
            elif fail:
                expected["failure"] += 1
                stopped = not telemetry.continue_on_error
            else:
                expected["success"] += 1
    return plan


async def work(request: Request) -> Response:
    n = int(request.query_params.get("n", "10"))
    fail_every = int(request.query_params.get("fail_every", "10"))
    tasks = BackgroundTasks(telemetry=telemetry)
    for i, (sync, fail) in enumerate(_plan(n, fail_every)):
        tasks.add_task(work_sync if sync else work_async, i, fail)
    return Response("ok", background=tasks)


async def hold_async(secs: float) -> None:
    started["async"] += 1
    await asyncio.sleep(secs)


def hold_sync(secs: float) -> None:
    started["sync"] += 1
    time.sleep(secs)


async def queued() -> None:
    started["queued"] += 1


async def hold(request: Request) -> Response:
    """One long task (async or sync) with ``queued`` quick tasks behind it."""
    global added
    kind = request.query_params.get("kind", "async")
    secs = float(request.query_params.get("secs", "30"))
    behind = int(request.query_params.get("queued", "2"))
    tasks = BackgroundTasks(telemetry=telemetry)
    tasks.add_task(hold_sync if kind == "sync" else hold_async, secs)
    for _ in range(behind):
        tasks.add_task(queued)
    with _plan_lock:
        added += 1 + behind
    return Response("ok", background=tasks)


async def stream(request: Request) -> Response:
    """Streams ``chunks`` chunks slowly; the background task runs after the stream ends."""
    global added
    chunks = int(request.query_params.get("chunks", "50"))

    async def body() -> AsyncIterator[bytes]:
        for _ in range(chunks):
            yield b"x" * 1024
            await asyncio.sleep(0.01)

    tasks = BackgroundTasks(telemetry=telemetry)
    tasks.add_task(work_async, 0, False)
    with _plan_lock:
        added += 1
    return StreamingResponse(body(), background=tasks)


def _generated(index: int) -> Callable[[], None]:
    def task() -> None:
        pass

    task.__qualname__ = f"generated_{index}"
    return task


async def names(request: Request) -> Response:
    """Tasks whose names are all distinct (hostile label cardinality)."""
    global added
    first = int(request.query_params["first"])
    count = int(request.query_params.get("count", "100"))
    tasks = BackgroundTasks(telemetry=telemetry)
    for index in range(first, first + count):
        tasks.add_task(_generated(index))
    with _plan_lock:
        added += count
    return Response("ok", background=tasks)


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def snapshot(*, final: bool = False) -> dict[str, Any]:
    outcomes: Counter[str] = Counter()
    by_task: dict[str, float] = {}
    series = 0
    stall_series = 0  # born with a label's first stall (bounded, not a leak)
    stalled: set[str] = set()
    lag_hist = {"count": 0.0, "sum": 0.0}
    otlp_failures: dict[str, float] = {}
    warnings: dict[str, float] = {}
    thread_wait = {"count": 0.0, "sum": 0.0}
    for metric in registry.collect():
        series += len(metric.samples)
        if metric.name == "taskscope_task_loop_block_seconds":
            stall_series += len(metric.samples)
            stalled.update(sample.labels["task"] for sample in metric.samples)
        elif metric.name == "taskscope_task_loop_blocks":  # "outside tasks": first stall
            stall_series += sum(s.labels["task"] == OUTSIDE_TASKS for s in metric.samples)
        for sample in metric.samples:
            if sample.name == "taskscope_tasks_total":
                if not sample.value:  # the zeros created for the alert rules
                    continue
                outcomes[sample.labels["outcome"]] += int(sample.value)
                key = f"{sample.labels['task']}|{sample.labels['outcome']}"
                by_task[key] = sample.value
            elif sample.name == "taskscope_event_loop_lag_seconds_count":
                lag_hist["count"] = sample.value
            elif sample.name == "taskscope_event_loop_lag_seconds_sum":
                lag_hist["sum"] = sample.value
            elif sample.name == "taskscope_otlp_export_failures_total":
                otlp_failures[sample.labels.get("signal", "")] = sample.value
            elif sample.name == "taskscope_otlp_spans_dropped_total":
                otlp_failures["spans_dropped"] = sample.value
            elif sample.name == "taskscope_task_thread_wait_seconds_count":
                thread_wait["count"] += sample.value
            elif sample.name == "taskscope_task_thread_wait_seconds_sum":
                thread_wait["sum"] += sample.value
            elif sample.name == "taskscope_task_warnings_total":
                warnings[f"{sample.labels['task']}|{sample.labels['kind']}"] = sample.value
    values = list(lags)
    result: dict[str, Any] = {
        "added": added,
        "expected": dict(expected),
        "outcomes": dict(outcomes),
        "distinct_tasks": len({key.split("|")[0] for key in by_task}),
        "task_names": sorted({key.split("|")[0] for key in by_task}),
        "started": dict(started),
        "series": series,
        "stall_series": stall_series,
        "stalled": sorted(stalled),
        "lag": {
            "n": len(values),
            "p50": _quantile(values, 0.5),
            "p99": _quantile(values, 0.99),
            "max": max(values, default=0.0),
            "mean": statistics.fmean(values) if values else 0.0,
        },
        "taskscope_lag": lag_hist,
        "otlp_failures": otlp_failures,
        "warnings": warnings,
        "thread_wait": thread_wait,
        "rss": _rss(),
        "threads": sorted(t.name for t in threading.enumerate()),
        "fds": len(os.listdir("/proc/self/fd")),
        "pid": os.getpid(),
        "time": time.monotonic(),
        "otlp_shutdown_s": _state.get("otlp_shutdown_s"),
    }
    if final:
        result["registry_text"] = generate_latest(registry).decode()
    return result


async def stats(request: Request) -> Response:
    if request.query_params.get("reset"):
        lags.clear()
    result = snapshot()
    # Reading the registry here holds the loop (tens of ms with 20k+ series): that stall
    # is the measurement's, not the app's, so the heartbeat it delays is not counted.
    _state["skip_beat"] = True
    return JSONResponse(result)


async def _heartbeat() -> None:
    interval = 0.01
    clock = time.perf_counter  # uvloop's loop.time() has millisecond resolution
    while True:
        due = clock() + interval
        await asyncio.sleep(interval)
        if _state.pop("skip_beat", False):
            continue
        lags.append(max(0.0, clock() - due))


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    beat = asyncio.get_running_loop().create_task(_heartbeat())
    _state["up"] = True
    try:
        yield
    finally:
        beat.cancel()
        _write_final("lifespan")
        if _otlp is not None:
            began = time.monotonic()
            _otlp.shutdown()
            _state["otlp_shutdown_s"] = time.monotonic() - began
            _write_final("otlp_shutdown")


routes: list[Any] = [
    Route("/work", work),
    Route("/hold", hold),
    Route("/stream", stream),
    Route("/names", names),
    Route("/stats", stats),
]
if os.environ.get("TS_METRICS") == "1":
    try:
        from taskscope.exposition import MetricsApp

        routes.append(Route("/metrics", MetricsApp(registry)))
    except ImportError:  # the exposition module is not there yet: prometheus_client's
        from prometheus_client import make_asgi_app

        routes.append(Route("/metrics", make_asgi_app(registry)))


class _Passthrough(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)


middleware = [Middleware(_Passthrough) for _ in range(int(os.environ.get("TS_BASEHTTP", "0")))]
app: Any
if os.environ.get("TS_FASTAPI") == "1":
    # FastAPI builds the BackgroundTasks object itself; instrument_app scopes the settings.
    from fastapi import FastAPI

    from taskscope import instrument_app

    fast = FastAPI(routes=routes[1:], lifespan=lifespan, middleware=middleware)

    @fast.get("/work")
    async def fastapi_work(tasks: BackgroundTasks, n: int = 10, fail_every: int = 10) -> str:
        for i, (sync, fail) in enumerate(_plan(n, fail_every)):
            tasks.add_task(work_sync if sync else work_async, i, fail)
        return "ok"

    instrument_app(fast, telemetry)
    app = fast
else:
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware)
