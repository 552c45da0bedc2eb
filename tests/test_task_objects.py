"""Every object Starlette accepts as a background task runs as Starlette runs it.

Custom ``__call__`` methods run (their own code, in order), collections nested in a
collection run task by task, and each is recorded once, through the drop-in classes and
through ``instrument()`` on Starlette's own classes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from starlette.background import BackgroundTask as StarletteBackgroundTask
from starlette.background import BackgroundTasks as StarletteBackgroundTasks
from starlette.responses import Response
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send

import taskscope
from taskscope import TelemetryMiddleware
from tests.conftest import Observed

pytestmark = pytest.mark.usefixtures("both_record_paths")

Classes = tuple[type[StarletteBackgroundTask], type[StarletteBackgroundTasks]]


@pytest.fixture(params=["dropin", "instrument"])
def classes(request: pytest.FixtureRequest) -> Iterator[Classes]:
    """taskscope's drop-in classes, or Starlette's own under ``taskscope.instrument()``."""
    if request.param == "dropin":
        yield taskscope.BackgroundTask, taskscope.BackgroundTasks
        return
    taskscope.instrument()
    try:
        yield StarletteBackgroundTask, StarletteBackgroundTasks
    finally:
        taskscope.uninstrument()


def _serve(background: StarletteBackgroundTask, observed: Observed, backend: str) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await Response("ok", background=background)(scope, receive, send)

    client = TestClient(TelemetryMiddleware(app, observed.telemetry), backend=backend)  # type: ignore[arg-type,unused-ignore]
    assert client.get("/").text == "ok"


def _names(observed: Observed) -> dict[str, float]:
    return {
        f"{task.rsplit('.', 1)[-1]}:{outcome}": n
        for (task, outcome), n in observed.outcomes().items()
    }


def test_custom_call_runs_its_own_code(
    classes: Classes, observed: Observed, anyio_backend: str
) -> None:
    """A subclass overriding ``__call__`` runs its code around ``super().__call__()``."""
    task_class, tasks_class = classes
    executed: list[str] = []

    def record(value: str) -> None:
        executed.append(value)

    class CustomTask(task_class):  # type: ignore[valid-type,misc]
        async def __call__(self) -> None:
            executed.append("before")
            await super().__call__()
            executed.append("after")

    background = tasks_class([CustomTask(record, "custom")])
    background.add_task(record, "plain")
    _serve(background, observed, anyio_backend)
    assert executed == ["before", "custom", "after", "plain"]
    assert _names(observed) == {"record:success": 2.0}
    assert len(observed.task_spans()) == 2


def test_custom_call_failure_is_recorded_once(
    classes: Classes, observed: Observed, anyio_backend: str
) -> None:
    """A custom ``__call__`` that raises: one failure, the rest skipped, same exception."""
    task_class, tasks_class = classes
    executed: list[str] = []

    class Failing(task_class):  # type: ignore[valid-type,misc]
        async def __call__(self) -> None:
            raise LookupError("custom")

    def after() -> None:
        executed.append("after")

    background = tasks_class([Failing(after)])
    background.add_task(after)
    with pytest.raises(LookupError, match="custom"):
        _serve(background, observed, anyio_backend)
    assert executed == []
    assert _names(observed) == {"after:failure": 1.0, "after:skipped": 1.0}


def test_nested_collections_run_task_by_task(
    classes: Classes, observed: Observed, anyio_backend: str
) -> None:
    """A collection inside a collection runs in its turn; each inner task is recorded."""
    _, tasks_class = classes
    executed: list[str] = []

    def first() -> None:
        executed.append("first")

    async def inner() -> None:
        executed.append("inner")

    def last() -> None:
        executed.append("last")

    nested = tasks_class()
    nested.add_task(inner)
    nested.add_task(inner)
    outer = tasks_class()
    outer.add_task(first)
    outer.tasks.append(nested)
    outer.add_task(last)
    _serve(outer, observed, anyio_backend)
    assert executed == ["first", "inner", "inner", "last"]
    assert _names(observed) == {"first:success": 1.0, "inner:success": 2.0, "last:success": 1.0}


def test_failure_inside_nested_collection_skips_the_rest(
    classes: Classes, observed: Observed, anyio_backend: str
) -> None:
    """As in Starlette, a failure in a nested collection stops the outer one too."""
    _, tasks_class = classes
    executed: list[str] = []

    async def boom() -> None:
        raise ValueError("inner")

    def never() -> None:
        executed.append("never")

    nested = tasks_class()
    nested.add_task(boom)
    nested.add_task(never)
    outer = tasks_class()
    outer.tasks.append(nested)
    outer.add_task(never)
    with pytest.raises(ValueError, match="inner"):
        _serve(outer, observed, anyio_backend)
    assert executed == []
    assert _names(observed) == {"boom:failure": 1.0, "never:skipped": 2.0}


def test_objects_without_func_are_awaited_and_named_by_type(
    observed: Observed, anyio_backend: str
) -> None:
    """Any object with an async ``__call__`` in ``tasks`` runs, recorded under its type."""
    executed: list[str] = []

    class Job:
        async def __call__(self) -> None:
            executed.append("job")

    background = taskscope.BackgroundTasks()
    background.tasks.append(Job())  # type: ignore[arg-type]
    _serve(background, observed, anyio_backend)
    assert executed == ["job"]
    assert _names(observed) == {"Job:success": 1.0}


def test_bound_builtin_is_named_after_its_type(observed: Observed, anyio_backend: str) -> None:
    """``items.append`` is ``builtins.list.append``, not ``<unknown>.list.append``."""
    items: list[Any] = []
    background = taskscope.BackgroundTasks()
    background.add_task(items.append, 1)
    _serve(background, observed, anyio_backend)
    assert items == [1]
    assert list(observed.outcomes()) == [("builtins.list.append", "success")]
