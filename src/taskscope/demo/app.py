"""The demo app: FastAPI's background-tasks tutorial, plus the trouble real apps have.

``POST /send-notification/{email}`` is the tutorial: a log-writing task added by a
dependency and a notification task added by the path operation, imported from taskscope
instead of FastAPI. Around it, on purpose:

* the e-mail fails sometimes (``ConnectionError``, now and then ``TimeoutError``), and
  the log line added after it is then skipped, as Starlette does;
* ``POST /reports/{id}`` renders a report in a slow sync task: a burst of them queues
  for the (deliberately small) threadpool;
* ``POST /thumbnails/{id}`` runs an ``async def`` task that calls a blocking function,
  holding the event loop for 150 ms.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import anyio.to_thread
from fastapi import Depends, FastAPI
from starlette.routing import Route

from taskscope import BackgroundTasks, Telemetry, instrument_app, start_loop_probe

DEMO_THREADS = 4
"""Worker threads for sync code (anyio's default is 40): small, so thread waits show."""

LOG_FILE = Path(tempfile.gettempdir()) / "taskscope-demo-log.txt"


# -- the tasks ---------------------------------------------------------------------------
def write_log(message: str) -> None:
    """The tutorial's task: append a line to the log file (sync: runs in the threadpool)."""
    with LOG_FILE.open(mode="a") as log:
        log.write(message)


async def send_notification_email(email: str, message: str) -> None:
    """Talks to a flaky SMTP server: fails about one time in four."""
    await asyncio.sleep(random.uniform(0.01, 0.05))
    roll = random.random()
    if roll < 0.20:
        msg = "SMTP server refused the connection"
        raise ConnectionError(msg)
    if roll < 0.25:
        await asyncio.sleep(0.1)
        msg = "SMTP server did not answer in time"
        raise TimeoutError(msg)


def render_report(report_id: int) -> None:
    """A slow sync task (think: a PDF export); it holds a worker thread 0.3-0.6 s."""
    time.sleep(random.uniform(0.3, 0.6))


async def resize_thumbnail(image_id: int) -> None:
    """An ``async def`` task with a sync call inside: it freezes every request meanwhile."""
    await asyncio.sleep(0)
    time.sleep(0.15)  # <- BLOCKS THE EVENT LOOP (sync call inside async def)
    await asyncio.sleep(0.01)


# -- the app -----------------------------------------------------------------------------
def get_query(background_tasks: BackgroundTasks, q: str | None = None) -> str | None:
    if q:
        message = f"found query: {q}\n"
        background_tasks.add_task(write_log, message)
    return q


def create_app(
    telemetry: Telemetry, metrics_app: Any = None, *, report_task: Any = None
) -> FastAPI:
    """The instrumented app; ``metrics_app`` (an ASGI app) is served at ``/metrics``.

    ``report_task`` (a Celery task): reports are published to it after the response
    (``taskscope demo --scale-out``) instead of rendered in the web process.
    """

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = DEMO_THREADS
        await start_loop_probe(telemetry)  # loop lag from the start, not the first task
        yield

    app = FastAPI(title="taskscope demo", lifespan=lifespan)

    @app.post("/send-notification/{email}")
    async def send_notification(
        email: str, background_tasks: BackgroundTasks, q: Annotated[str | None, Depends(get_query)]
    ) -> dict[str, str]:
        message = f"message to {email}\n"
        background_tasks.add_task(send_notification_email, email, message)
        background_tasks.add_task(write_log, message)  # skipped when the e-mail fails
        return {"message": "Notification sent in the background"}

    @app.post("/reports/{report_id}")
    async def export_report(report_id: int, background_tasks: BackgroundTasks) -> dict[str, str]:
        if report_task is None:
            background_tasks.add_task(render_report, report_id)
        else:
            from taskscope.celery import queued

            background_tasks.add_task(queued(report_task), report_id)
        return {"message": "Report export started"}

    @app.post("/thumbnails/{image_id}")
    async def make_thumbnail(image_id: int, background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(resize_thumbnail, image_id)
        return {"message": "Thumbnail queued"}

    if metrics_app is not None:
        app.router.routes.append(Route("/metrics", _Endpoint(metrics_app), include_in_schema=False))
    instrument_app(app, telemetry)
    return app


class _Endpoint:
    """Makes Starlette treat any ASGI callable (even a plain function) as an ASGI app."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def metrics_app_for(registry: Any) -> Any:
    """taskscope's exposition app (renders off the loop) if present, else prometheus_client's."""
    try:
        from taskscope.exposition import MetricsApp
    except ImportError:  # pragma: no cover - taskscope without its exposition module
        from prometheus_client import make_asgi_app

        return make_asgi_app(registry)
    return MetricsApp(registry)
