"""How Starlette would run an object it accepts as a background task.

Starlette runs every task with ``await task()``. taskscope runs the task *itself* only where
that is exactly what ``task()`` would do (the stock ``BackgroundTask.__call__``, or
taskscope's own), so it can time the worker thread and the loop steps; anything else (a
subclass with its own ``__call__``, a class patched by another instrumentation) is awaited
through its own ``__call__``, with the record around it. Collections nested in a
collection are run task by task, as Starlette's loop would.
"""

from __future__ import annotations

import contextlib
import sys
from enum import Enum
from types import FunctionType
from typing import Any

from starlette.background import BackgroundTask as StarletteBackgroundTask
from starlette.background import BackgroundTasks as StarletteBackgroundTasks

# (file suffix, qualname) of the framework ``__call__`` methods whose behaviour is known.
_STOCK_TASK_CALLS = frozenset({("starlette/background.py", "BackgroundTask.__call__")})
_STOCK_COLLECTION_CALLS = frozenset(
    {
        ("starlette/background.py", "BackgroundTasks.__call__"),
        ("fastapi/background.py", "BackgroundTasks.__call__"),
    }
)
# taskscope's own __call__ methods and class patches register here (they behave as stock).
own_task_calls: set[Any] = set()
own_collection_calls: set[Any] = set()


class Kind(Enum):
    PLAIN = "plain"  # taskscope calls ``func`` as Starlette's BackgroundTask.__call__ would
    NESTED = "nested"  # a collection: its tasks run one by one, each recorded
    OPAQUE = "opaque"  # its own ``__call__``: awaited as is, recorded around


def _is_stock(method: Any, known: frozenset[tuple[str, str]]) -> bool:
    if type(method) is not FunctionType:
        return False  # a wrapper object (wrapt and the like): someone else's code runs
    code = method.__code__
    filename = code.co_filename.replace("\\", "/")
    return any(
        filename.endswith(suffix) and code.co_qualname == qualname for suffix, qualname in known
    )


# Kind per task type, valid while Starlette's BackgroundTask.__call__ is the one it was
# computed for: the base may be patched later (instrument(), another instrumentation).
_kinds: dict[type, Kind] = {}
_kinds_base: list[Any] = [None]
_KINDS_CACHE_SIZE = 1024


def kind_of(task: object) -> Kind:
    """How ``task`` is run (never raises: an unknown object is awaited as is)."""
    if StarletteBackgroundTask.__call__ is not _kinds_base[0]:
        _kinds.clear()
        _kinds_base[0] = StarletteBackgroundTask.__call__
    cls = type(task)
    kind = _kinds.get(cls)
    if kind is None:
        kind = _kind_of_type(cls)
        if len(_kinds) < _KINDS_CACHE_SIZE:
            _kinds[cls] = kind
    return kind


def _kind_of_type(cls: type) -> Kind:
    try:
        method = cls.__call__
        if issubclass(cls, StarletteBackgroundTasks):
            if method in own_collection_calls or _is_stock(method, _STOCK_COLLECTION_CALLS):
                return Kind.NESTED
            return Kind.OPAQUE
        if not issubclass(cls, StarletteBackgroundTask):
            return Kind.OPAQUE
        if method in own_task_calls:
            # taskscope's drop-in task: what Starlette's base class does now decides.
            method = StarletteBackgroundTask.__call__
        if method in own_task_calls or _is_stock(method, _STOCK_TASK_CALLS):
            return Kind.PLAIN
    except Exception:  # noqa: S110 - a hostile type: awaited through its own __call__
        pass
    return Kind.OPAQUE


def is_sync(task: object) -> bool:
    """Whether the task runs in the threadpool, as far as can be told without running it."""
    try:
        is_async = getattr(task, "is_async", None)
    except Exception:
        return False
    return is_async is False


def framework_hook() -> Any:
    """FastAPI's per-task context factory, if FastAPI (>= 0.142) is loaded; else ``None``.

    FastAPI's own ``BackgroundTasks`` loop opens ``_operation(name="background_task",
    function=task.func)`` around each task: a ``fastapi.background_task`` span when its
    telemetry traces the request. taskscope runs each task inside that same context, so with
    FastAPI's telemetry on the task's span is FastAPI's (in the provider FastAPI uses for
    the app), and with it off nothing changes. Looked up once per response.
    """
    module = sys.modules.get("fastapi.background")
    return None if module is None else getattr(module, "_operation", None)


def framework_operation(hook: Any, task: object) -> Any:
    """The context ``hook`` opens around ``task``; ``None`` when it would do nothing (no
    telemetry for this request) or the task has no ``func`` (FastAPI's loop fails on it)."""
    func = getattr(task, "func", None)
    if func is None:
        return None
    context = hook(name="background_task", function=func)
    return None if isinstance(context, contextlib.nullcontext) else context
