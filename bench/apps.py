"""The FastAPI apps served by uvicorn in the HTTP benchmark, one per variant.

``BENCH_VARIANT`` (read when uvicorn imports this module, in the server subprocess) selects
the variant (see ``variants.py``); ``BENCH_TASKS=mixed`` makes the second task sync;
``BENCH_GC_FREEZE=1`` calls ``gc.freeze()`` once the app is built. Every app has
``GET /hit``, which adds two tiny background tasks and returns a small JSON body::

    BENCH_VARIANT=ts-full uvicorn apps:app --app-dir bench
"""

from __future__ import annotations

import gc
import os
from typing import Any

from fastapi import BackgroundTasks, FastAPI

from common import dropping_tracer_provider
from variants import Variant


async def tiny_async(n: int) -> None:
    return None


def tiny_sync(n: int) -> None:
    return None


def build(name: str) -> FastAPI:
    tasks_kind = os.environ.get("BENCH_TASKS", "async")
    if name == "fastapi-native":
        # FastAPI's own telemetry, tracing only (request span, operation spans, and a
        # `fastapi.background_task` span per task); metrics and logs off.
        app = FastAPI(
            telemetry={
                "tracer_provider": dropping_tracer_provider(),
                "metrics": False,
                "logs": False,
            }
        )
        wrap: Any = _same
    else:
        app = FastAPI()
        variant = Variant(name)  # fresh CollectorRegistry, own tracer provider
        wrap = variant.task
        if name.startswith("ts-"):
            from taskscope import instrument_app

            instrument_app(app, variant.telemetry)
    first = wrap(tiny_async)
    second = wrap(tiny_sync if tasks_kind == "mixed" else tiny_async)

    @app.get("/hit")
    async def hit(background_tasks: BackgroundTasks) -> dict[str, bool]:
        background_tasks.add_task(first, 1)
        background_tasks.add_task(second, 2)
        return {"ok": True}

    return app


def _same(func: Any) -> Any:
    return func


app = build(os.environ.get("BENCH_VARIANT", "plain"))
if os.environ.get("BENCH_GC_FREEZE"):
    # Move everything imported so far out of the collector's reach: gen-2 collections then
    # scan only what requests allocate (what many production setups do after startup).
    gc.collect()
    gc.freeze()
