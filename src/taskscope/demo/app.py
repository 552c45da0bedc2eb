"""The demo app: FastAPI's background-tasks tutorial, plus the trouble real apps have.

``POST /send-notification/{email}`` is the tutorial: a log-writing task added by a
dependency and a notification task added by the path operation, imported from taskscope
instead of FastAPI. Around it, on purpose:

* the e-mail fails sometimes (``ConnectionError``, now and then ``TimeoutError``), and
  the log line added after it is then skipped, as Starlette does;
* ``POST /reports/{id}`` renders a report in a slow sync task: a burst of them queues
  for the (deliberately small) threadpool;
* ``POST /thumbnails/{id}`` runs an ``async def`` task that calls a blocking function,
  holding the event loop for 150 ms;
* ``POST /orders/{id}`` tells a partner API about the order, and that upstream is dead: it
  accepts the connection and never answers, and the task has no timeout. It hangs, and
  taskscope reports it (``task.hung``) with the line it waits at.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import anyio.to_thread
from fastapi import Depends, FastAPI, Request
from starlette.routing import Route

from taskscope import BackgroundTasks, Telemetry, instrument_app, start_loop_probe

DEMO_THREADS = 4
"""Worker threads for sync code (anyio's default is 40): small, so thread waits show."""

DEMO_HUNG_AFTER = 3.0
"""The demo reports hung tasks after 3 s (the default is 60 s), so one shows in a short run."""

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


async def sync_with_partner(order_id: int, partner: tuple[str, int]) -> None:
    """Posts the order to a partner API, with no timeout; the partner never answers."""
    reader, writer = await asyncio.open_connection(*partner)
    try:
        writer.write(f"POST /orders/{order_id} HTTP/1.1\r\nHost: partner\r\n\r\n".encode())
        await writer.drain()
        await reader.readline()  # <- HANGS: the upstream never answers (and no timeout)
    finally:
        writer.close()


class DeadUpstream:
    """A partner API on 127.0.0.1 that accepts connections and never answers.

    :meth:`close` (the demo's end) hangs up on every caller, so the hung tasks end
    rather than holding the server's shutdown.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        host, port = self._listener.getsockname()[:2]
        self.address: tuple[str, int] = (host, port)
        self._held: list[socket.socket] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="demo-upstream", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(conn)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2)
        self._listener.close()
        for conn in self._held:
            with contextlib.suppress(OSError):
                conn.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    while conn.recv(65536):  # read the request: closing then sends no RST
                        pass
                conn.shutdown(socket.SHUT_WR)  # end of stream: the caller's read returns
            conn.close()


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
    app.state.partner = DeadUpstream()  # closed by the demo's end (app.state.partner.close())

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

    @app.post("/orders/{order_id}")
    async def place_order(
        order_id: int, request: Request, background_tasks: BackgroundTasks
    ) -> dict[str, str]:
        background_tasks.add_task(sync_with_partner, order_id, request.app.state.partner.address)
        return {"message": "Order placed"}

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
