"""Instrumenting without changing imports: ``instrument_app(app)`` and ``instrument()``."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.background import BackgroundTask as StarletteBackgroundTask
from starlette.background import BackgroundTasks as StarletteBackgroundTasks

from taskscope import _fastapi
from taskscope._config import Telemetry
from taskscope._run import recording_opaque, run_tasks
from taskscope._runtime import current_telemetry
from taskscope._task_kinds import own_collection_calls, own_task_calls

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]

_lock = threading.Lock()
_originals: dict[tuple[type, str], Any] = {}
_everywhere = False  # instrument(): plain Starlette/FastAPI tasks of every app


class TelemetryMiddleware:
    """Pure ASGI middleware: tasks of this app's requests use this app's settings."""

    def __init__(self, app: ASGIApp, telemetry: Telemetry) -> None:
        self.app = app
        self.telemetry = telemetry

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = current_telemetry.set(self.telemetry)
        try:
            await self.app(scope, receive, send)
        finally:
            current_telemetry.reset(token)


def instrument_app(app: Any, telemetry: Telemetry | None = None) -> Telemetry:
    """Instrument every background task of a Starlette/FastAPI app, imports unchanged.

    Adds a small ASGI middleware that scopes ``telemetry`` to the app's requests, makes
    FastAPI build taskscope's ``BackgroundTasks`` and routes Starlette's own
    ``BackgroundTask(s)`` through taskscope while a request of this app runs them.
    Call it before the app starts. Returns the settings in use.
    """
    telemetry = telemetry if telemetry is not None else Telemetry()
    add_middleware = getattr(app, "add_middleware", None)
    if add_middleware is None:
        msg = (
            "instrument_app() needs a Starlette or FastAPI app; "
            "wrap other ASGI apps in TelemetryMiddleware"
        )
        raise TypeError(msg)
    add_middleware(TelemetryMiddleware, telemetry=telemetry)
    _fastapi.ensure_bound("instrument")
    _patch_plain_classes()
    return telemetry


def instrument() -> None:
    """Process-wide: every Starlette/FastAPI background task is observed (default settings).

    What ``opentelemetry-instrument`` calls through the entry point. Undo with
    :func:`uninstrument`.
    """
    global _everywhere  # noqa: PLW0603 - explicit, process-wide opt-in
    _everywhere = True
    _fastapi.ensure_bound("instrument")
    _patch_plain_classes()


def uninstrument() -> None:
    """Undo :func:`instrument` and :func:`instrument_app`'s class patches."""
    global _everywhere  # noqa: PLW0603
    _everywhere = False
    _fastapi.cancel_when_loaded(_patch_fastapi_class)
    with _lock:
        for (cls, attribute), original in _originals.items():
            setattr(cls, attribute, original)
        _originals.clear()
    _fastapi.unbind("instrument")


def _observing() -> bool:
    return _everywhere or current_telemetry.get() is not None


def _patch_plain_classes() -> None:
    """Route Starlette's (and FastAPI's, now or once imported) classes through taskscope.

    Each patch is active only while :func:`_observing` says so, and undone by
    :func:`uninstrument`. FastAPI's class is patched whatever the import order: now if
    FastAPI is loaded, otherwise as soon as it is.
    """
    with _lock:
        if (StarletteBackgroundTask, "__call__") in _originals:
            return
        single = StarletteBackgroundTask.__call__
        many = StarletteBackgroundTasks.__call__

        async def call_one(self: StarletteBackgroundTask) -> None:
            if _observing() and recording_opaque.get() is not self:
                await run_tasks([self])
            else:  # not observed, or a subclass's super().__call__() inside its record
                await single(self)

        async def call_many(self: StarletteBackgroundTasks) -> None:
            if _observing():
                await run_tasks(self.tasks)
            else:
                await many(self)

        _originals[(StarletteBackgroundTask, "__call__")] = single
        _originals[(StarletteBackgroundTasks, "__call__")] = many
        own_task_calls.add(call_one)
        own_collection_calls.add(call_many)
        StarletteBackgroundTask.__call__ = call_one  # type: ignore[method-assign]
        StarletteBackgroundTasks.__call__ = call_many  # type: ignore[method-assign]
    _fastapi.when_loaded(_patch_fastapi_class)


def _patch_fastapi_class() -> None:
    """FastAPI's ``BackgroundTasks.__call__``: taskscope's loop, which opens FastAPI's own
    per-task context itself (so one span per task, FastAPI's when its telemetry is on)."""
    import fastapi.background

    cls = fastapi.background.BackgroundTasks
    with _lock:
        if (cls, "__call__") in _originals or not _originals:
            return  # already patched, or uninstrumented meanwhile
        fastapi_many = cls.__call__

        async def call_fastapi(self: Any) -> None:
            if _observing():
                await run_tasks(self.tasks)
            else:
                await fastapi_many(self)

        _originals[(cls, "__call__")] = fastapi_many
        own_collection_calls.add(call_fastapi)
        cls.__call__ = call_fastapi  # type: ignore[method-assign]


class TaskscopeInstrumentor:
    """Entry point for ``opentelemetry-instrument`` (disable with
    ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=taskscope``)."""

    def instrumentation_dependencies(self) -> tuple[str, ...]:
        return ("starlette >= 0.38",)

    def instrument(self, **_: Any) -> None:
        instrument()

    def uninstrument(self, **_: Any) -> None:
        uninstrument()
