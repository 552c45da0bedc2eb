"""Instrumenting without changing imports: ``instrument_app(app)`` and ``instrument()``."""

from __future__ import annotations

import threading
import weakref
from typing import Any

from starlette.background import BackgroundTask as StarletteBackgroundTask
from starlette.background import BackgroundTasks as StarletteBackgroundTasks
from starlette.types import ASGIApp, Receive, Scope, Send

from taskscope import _fastapi
from taskscope._config import Telemetry
from taskscope._run import recording_opaque, run_tasks
from taskscope._runtime import current_telemetry
from taskscope._task_kinds import own_collection_calls, own_task_calls

_lock = threading.Lock()
_originals: dict[tuple[type, str], Any] = {}
_everywhere = False  # instrument(): plain Starlette/FastAPI tasks of every app
_everywhere_telemetry: Telemetry | None = None  # instrument(telemetry)


class _AppScope:
    """The settings one app's requests use; replaced by a later ``instrument_app`` call."""

    __slots__ = ("telemetry",)

    def __init__(self, telemetry: Telemetry | None) -> None:
        self.telemetry = telemetry


class _ScopedMiddleware:
    """Pure ASGI middleware: the tasks of each HTTP request use the scope's settings."""

    def __init__(self, app: ASGIApp, scope: _AppScope) -> None:
        self.app = app
        self.scope = scope

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        telemetry = self.scope.telemetry
        if telemetry is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = current_telemetry.set(telemetry)
        try:
            await self.app(scope, receive, send)
        finally:
            current_telemetry.reset(token)


class TelemetryMiddleware(_ScopedMiddleware):
    """Pure ASGI middleware: tasks of this app's requests use this app's settings."""

    def __init__(self, app: ASGIApp, telemetry: Telemetry) -> None:
        super().__init__(app, _AppScope(telemetry))
        self.telemetry = telemetry


_scopes: weakref.WeakKeyDictionary[Any, _AppScope] = weakref.WeakKeyDictionary()


def instrument_app(app: Any, telemetry: Telemetry | None = None) -> Telemetry:
    """Instrument every background task of a Starlette/FastAPI app, imports unchanged.

    Adds a small ASGI middleware that scopes ``telemetry`` to the app's requests, makes
    FastAPI build taskscope's ``BackgroundTasks`` and routes Starlette's own
    ``BackgroundTask(s)`` through taskscope while a request of this app runs them.
    The first call adds the middleware (or, on an app that has started already, wraps the
    stack it built); later calls only swap the settings, so a module-level app shared by
    many tests can be instrumented in each. Returns the settings in use. Undo with
    :func:`uninstrument_app`.
    """
    telemetry = telemetry if telemetry is not None else Telemetry()
    with _lock:
        app_scope = _scopes.get(app)
        if app_scope is None:
            add_middleware = getattr(app, "add_middleware", None)
            if add_middleware is None:
                msg = (
                    "instrument_app() needs a Starlette or FastAPI app; "
                    "wrap other ASGI apps in TelemetryMiddleware"
                )
                raise TypeError(msg)
            app_scope = _AppScope(telemetry)
            stack = getattr(app, "middleware_stack", None)
            if stack is None:
                add_middleware(_ScopedMiddleware, scope=app_scope)
            else:  # already started (Starlette refuses add_middleware): wrap what it built
                app.middleware_stack = _ScopedMiddleware(stack, app_scope)
            _scopes[app] = app_scope
        else:
            app_scope.telemetry = telemetry
    _fastapi.ensure_bound("instrument")
    _patch_plain_classes()
    return telemetry


def uninstrument_app(app: Any) -> None:
    """Undo :func:`instrument_app` for ``app``: its requests' tasks run as before.

    The middleware stays (it cannot be removed from a started app) but passes requests
    through; once no app is instrumented and :func:`instrument` is not on, the class
    patches are undone too.
    """
    with _lock:
        app_scope = _scopes.get(app)
        if app_scope is not None:
            app_scope.telemetry = None
        active = any(s.telemetry is not None for s in _scopes.values())
    if not active and not _everywhere:
        _undo_patches()


def instrument(telemetry: Telemetry | None = None) -> None:
    """Process-wide: every Starlette/FastAPI background task is observed.

    ``telemetry`` applies to the tasks of apps not given their own by
    :func:`instrument_app` (default: the process default). What ``opentelemetry-instrument``
    calls through the entry point. Undo with :func:`uninstrument`.
    """
    global _everywhere, _everywhere_telemetry  # noqa: PLW0603 - explicit, process-wide opt-in
    _everywhere = True
    _everywhere_telemetry = telemetry
    _fastapi.ensure_bound("instrument")
    _patch_plain_classes()


def uninstrument() -> None:
    """Undo :func:`instrument` and every :func:`instrument_app`."""
    global _everywhere, _everywhere_telemetry  # noqa: PLW0603
    _everywhere = False
    _everywhere_telemetry = None
    with _lock:
        for app_scope in _scopes.values():
            app_scope.telemetry = None
    _undo_patches()


def is_instrumented() -> bool:
    """Whether :func:`instrument` is on (process-wide)."""
    return _everywhere


def _undo_patches() -> None:
    _fastapi.cancel_when_loaded(_patch_fastapi_class)
    with _lock:
        for (cls, attribute), original in _originals.items():
            setattr(cls, attribute, original)
        _originals.clear()
    _fastapi.unbind("instrument")


def _observing() -> bool:
    return _everywhere or current_telemetry.get() is not None


def _scoped() -> Telemetry | None:
    """The app's settings (instrument_app), else instrument()'s; None: the default."""
    return current_telemetry.get() or _everywhere_telemetry


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
                await run_tasks([self], _scoped())
            else:  # not observed, or a subclass's super().__call__() inside its record
                await single(self)

        async def call_many(self: StarletteBackgroundTasks) -> None:
            if _observing():
                await run_tasks(self.tasks, _scoped())
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
                await run_tasks(self.tasks, _scoped())
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
