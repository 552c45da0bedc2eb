"""Starlette's own background-task behaviours, reproduced against taskscope's classes."""

from __future__ import annotations

import functools
from typing import Any

import pytest
from starlette.background import BackgroundTask as StarletteBackgroundTask
from starlette.background import BackgroundTasks as StarletteBackgroundTasks
from starlette.requests import Request
from starlette.responses import Response
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send

from taskscope import BackgroundTask, BackgroundTasks, TelemetryMiddleware
from tests.conftest import Observed


def _client(app: Any, backend: str, observed: Observed | None = None, **kw: Any) -> TestClient:
    """A test client for a raw ASGI app (no lifespan), scoped to the test's telemetry."""
    if observed is not None:
        app = TelemetryMiddleware(app, observed.telemetry)
    return TestClient(app, backend=backend, **kw)  # type: ignore[arg-type,unused-ignore]


def test_classes_are_real_subclasses() -> None:
    """isinstance/issubclass against Starlette's classes hold."""
    assert issubclass(BackgroundTasks, StarletteBackgroundTasks)
    assert issubclass(BackgroundTask, StarletteBackgroundTask)
    assert isinstance(BackgroundTasks(), StarletteBackgroundTask)


def test_async_task(observed: Observed, anyio_backend: str) -> None:
    """An async BackgroundTask runs after the response is sent."""
    state = {"done": False}

    async def async_task() -> None:
        state["done"] = True

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        task = BackgroundTask(async_task)
        response = Response("task initiated", media_type="text/plain", background=task)
        await response(scope, receive, send)

    response = _client(app, anyio_backend, observed).get("/")
    assert response.text == "task initiated"
    assert state["done"]
    assert list(observed.outcomes().values()) == [1.0]


def test_sync_task(observed: Observed, anyio_backend: str) -> None:
    """A sync BackgroundTask runs (in the threadpool) after the response."""
    state = {"done": False}

    def sync_task() -> None:
        state["done"] = True

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        task = BackgroundTask(sync_task)
        response = Response("task initiated", media_type="text/plain", background=task)
        await response(scope, receive, send)

    assert _client(app, anyio_backend, observed).get("/").text == "task initiated"
    assert state["done"]


def test_multiple_tasks_keep_order_args_and_kwargs(observed: Observed, anyio_backend: str) -> None:
    """add_task passes args and kwargs through and runs tasks in order, sync and async."""
    calls: list[tuple[str, int, str]] = []

    def increment(amount: int, *, tag: str) -> None:
        calls.append(("sync", amount, tag))

    async def aincrement(amount: int, *, tag: str) -> None:
        calls.append(("async", amount, tag))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        tasks = BackgroundTasks(telemetry=observed.telemetry)
        tasks.add_task(increment, 1, tag="a")
        tasks.add_task(aincrement, 2, tag="b")
        tasks.add_task(increment, amount=3, tag="c")
        response = Response("tasks initiated", media_type="text/plain", background=tasks)
        await response(scope, receive, send)

    assert _client(app, anyio_backend).get("/").text == "tasks initiated"
    assert calls == [("sync", 1, "a"), ("async", 2, "b"), ("sync", 3, "c")]


def test_failing_task_stops_the_rest_and_propagates(observed: Observed, anyio_backend: str) -> None:
    """Like Starlette: a failing task stops later ones and its exception propagates."""
    ran: list[int] = []

    def task(n: int) -> None:
        ran.append(n)
        if n == 2:
            raise ValueError("boom")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        tasks = BackgroundTasks(telemetry=observed.telemetry)
        for n in (1, 2, 3):
            tasks.add_task(task, n)
        response = Response("ok", background=tasks)
        await response(scope, receive, send)

    with pytest.raises(ValueError, match="boom"):
        _client(app, anyio_backend).get("/")
    assert ran == [1, 2]


def test_response_sent_before_failure_is_seen(observed: Observed, anyio_backend: str) -> None:
    """The client has its response even though a task failed (server exceptions off)."""

    async def bad() -> None:
        raise RuntimeError("after the response")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        response = Response("sent", background=BackgroundTask(bad))
        await response(scope, receive, send)

    client = _client(app, anyio_backend, observed, raise_server_exceptions=False)
    response = client.get("/")
    assert response.status_code == 200
    assert response.text == "sent"


def test_attributes_are_starlettes(observed: Observed) -> None:
    """tasks, func, args, kwargs and is_async behave exactly as Starlette's."""

    async def coro_fn(a: int, b: int = 0) -> None: ...

    def plain(a: int) -> None: ...

    class AsyncCallable:
        async def __call__(self) -> None: ...

    tasks = BackgroundTasks(telemetry=observed.telemetry)
    tasks.add_task(coro_fn, 1, b=2)
    tasks.add_task(plain, 3)
    tasks.add_task(functools.partial(coro_fn, 4))
    tasks.add_task(AsyncCallable())
    reference = StarletteBackgroundTasks()
    reference.add_task(coro_fn, 1, b=2)
    reference.add_task(plain, 3)
    reference.add_task(functools.partial(coro_fn, 4))
    reference.add_task(AsyncCallable())
    ours = [(t.args, t.kwargs, t.is_async) for t in tasks.tasks]
    theirs = [(t.args, t.kwargs, t.is_async) for t in reference.tasks]
    assert ours == theirs
    assert tasks.tasks[0].func is coro_fn
    assert all(isinstance(t, StarletteBackgroundTask) for t in tasks.tasks)


def test_constructed_with_task_list(observed: Observed, anyio_backend: str) -> None:
    """BackgroundTasks(tasks=[...]) runs the given tasks, plain Starlette ones included."""
    ran: list[str] = []

    async def one() -> None:
        ran.append("one")

    def two() -> None:
        ran.append("two")

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        tasks = BackgroundTasks([BackgroundTask(one), StarletteBackgroundTask(two)])
        await Response("ok", background=tasks)(scope, receive, send)

    _client(endpoint, anyio_backend, observed).get("/")
    assert ran == ["one", "two"]
    assert sum(observed.outcomes().values()) == 2


def test_request_object_route(observed: Observed, anyio_backend: str) -> None:
    """Works with Request-based endpoints (the usual Starlette route)."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    seen: list[str] = []

    async def record(path: str) -> None:
        seen.append(path)

    async def endpoint(request: Request) -> Response:
        tasks = BackgroundTasks(telemetry=observed.telemetry)
        tasks.add_task(record, request.url.path)
        return Response("ok", background=tasks)

    app = Starlette(routes=[Route("/x", endpoint)])
    with _client(app, anyio_backend) as client:
        client.get("/x")
    assert seen == ["/x"]
