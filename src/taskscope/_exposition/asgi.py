"""``MetricsApp``: an ASGI ``/metrics`` endpoint that renders in a worker thread."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import anyio
import anyio.lowlevel
import anyio.to_thread

from taskscope._exposition.render import Negotiated, Rendered, error_response, negotiate, render

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_logger = logging.getLogger("taskscope.exposition")

# Bytes per ASGI body message. A 1 MB body written in one send is copied by the server on
# the loop in one go, and 20 scrapes sharing one rendering all send at the same moment.
CHUNK_SIZE = 64 * 1024


class _Pending:
    """One rendering in flight; scrapes that want the same output wait for it."""

    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.result: Rendered | None = None


class _LoopState:
    """Per event loop: a one-thread limiter and the renderings in flight."""

    __slots__ = ("limiter", "pending", "token")

    def __init__(self, token: object) -> None:
        self.token = token
        self.limiter = anyio.CapacityLimiter(1)
        self.pending: dict[tuple[str, bool, tuple[str, ...]], _Pending] = {}


class MetricsApp:
    """Serve Prometheus metrics from an ASGI app without blocking its event loop.

    Route it: ``app.add_route("/metrics", MetricsApp())`` or ``Route("/metrics", MetricsApp())``
    (``app.mount("/metrics", ...)`` works, with a redirect from ``/metrics`` to ``/metrics/``).

    * Rendering runs in a worker thread behind a dedicated one-token limiter, so a
      scrape neither stalls the loop nor takes threads from the app's threadpool; while
      it runs, GC is paused and the GIL switch interval is 1 ms, process-wide, restored
      after (``polite=False``: neither; see ``taskscope._exposition.render``).
    * Concurrent scrapes asking for the same output share one rendering.
    * The body is sent in ``chunk_size`` pieces (64 KiB; ``0``: one piece), the loop
      running other work between them: a burst of scrapes of a 1 MB body no longer
      copies megabytes in one step of the loop.
    * ``Accept: application/openmetrics-text`` gets OpenMetrics (with exemplars);
      anything else gets the classic text format 0.0.4. Gzip when the client accepts it
      (and ``gzip`` is true). ``?name[]=...`` restricts the output, as in prometheus_client.
    * ``registry=None`` means, at each scrape: a fresh multiprocess registry when
      ``PROMETHEUS_MULTIPROC_DIR`` is set, else ``prometheus_client.REGISTRY``.
    """

    def __init__(
        self,
        registry: Collector | None = None,
        *,
        gzip: bool = True,
        chunk_size: int = CHUNK_SIZE,
        polite: bool = True,
    ) -> None:
        self.registry = registry
        self.gzip = gzip
        self.polite = polite
        self.chunk_size = chunk_size
        self._state: _LoopState | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # served on its own (e.g. `uvicorn module:app`)
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["method"] not in ("GET", "HEAD"):
            response = error_response(405, "Method Not Allowed", ("Allow", "GET, HEAD"))
        else:
            response = await self.render(_negotiate(scope, allow_gzip=self.gzip))
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": [(k.lower().encode(), v.encode()) for k, v in response.headers],
            }
        )
        body = b"" if scope["method"] == "HEAD" else response.body
        await send_in_chunks(send, body, self.chunk_size)

    async def render(self, negotiated: Negotiated) -> Rendered:
        """Render in the worker thread, or join a rendering of the same output in flight."""
        state = self._loop_state()
        while True:
            pending = state.pending.get(negotiated.key)
            if pending is not None:
                await pending.done.wait()
                if pending.result is not None:
                    return pending.result
                continue  # the leader was cancelled: render ourselves
            pending = _Pending()
            state.pending[negotiated.key] = pending
            try:
                pending.result = await anyio.to_thread.run_sync(
                    _render_safely, negotiated, self.registry, self.polite, limiter=state.limiter
                )
            finally:
                del state.pending[negotiated.key]
                pending.done.set()
            return pending.result

    def _loop_state(self) -> _LoopState:
        token = anyio.lowlevel.current_token()
        state = self._state
        if state is None or state.token != token:
            # One loop in practice; a new loop (tests, restarts) gets fresh primitives.
            state = self._state = _LoopState(token)
        return state


async def send_in_chunks(send: Send, body: bytes, chunk_size: int = CHUNK_SIZE) -> None:
    """Send ``body`` in ``chunk_size`` messages, letting the loop run between them.

    ``await send()`` does not yield to the loop unless the transport is paused, so each
    chunk is followed by a checkpoint: concurrent scrapes interleave with requests.
    """
    view = memoryview(body)
    start = 0
    while 0 < chunk_size < len(body) - start:
        chunk = bytes(view[start : start + chunk_size])
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await anyio.lowlevel.checkpoint()
        start += chunk_size
    await send({"type": "http.response.body", "body": bytes(view[start:])})


def _render_safely(negotiated: Negotiated, registry: Collector | None, polite: bool) -> Rendered:
    try:
        return render(negotiated, registry, polite=polite)
    except Exception:
        _logger.exception("rendering metrics failed")
        return error_response(500, "rendering metrics failed")


def _negotiate(scope: Scope, *, allow_gzip: bool) -> Negotiated:
    accept: list[str] = []
    encoding: list[str] = []
    for raw_name, raw_value in scope.get("headers", ()):
        name = raw_name.decode("latin-1").lower()
        if name == "accept":
            accept.append(raw_value.decode("latin-1"))
        elif name == "accept-encoding":
            encoding.append(raw_value.decode("latin-1"))
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    names = tuple(query.get("name[]", ()))
    return negotiate(",".join(accept), ",".join(encoding), names, allow_gzip=allow_gzip)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
