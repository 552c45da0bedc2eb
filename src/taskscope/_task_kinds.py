"""How Starlette would run an object it accepts as a background task.

Starlette runs every task with ``await task()``. taskscope runs the task *itself* only where
that is exactly what ``task()`` would do (the stock ``BackgroundTask.__call__``, or
taskscope's own), so it can time the worker thread and the loop steps; anything else (a
subclass with its own ``__call__``, a class patched by another instrumentation) is awaited
through its own ``__call__``, with the record around it. Collections nested in a
collection are run task by task, as Starlette's loop would.
"""

from __future__ import annotations

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


def kind_of(task: object) -> Kind:
    """How ``task`` is run (never raises: an unknown object is awaited as is)."""
    try:
        method = type(task).__call__
        if isinstance(task, StarletteBackgroundTasks):
            if method in own_collection_calls or _is_stock(method, _STOCK_COLLECTION_CALLS):
                return Kind.NESTED
            return Kind.OPAQUE
        if method in own_task_calls:
            # taskscope's drop-in task: what Starlette's base class does now decides.
            method = StarletteBackgroundTask.__call__
        if (method in own_task_calls or _is_stock(method, _STOCK_TASK_CALLS)) and _has_call_data(
            task
        ):
            return Kind.PLAIN
    except Exception:  # noqa: S110 - a hostile type: awaited through its own __call__
        pass
    return Kind.OPAQUE


def _has_call_data(task: object) -> bool:
    data = getattr(task, "__dict__", None)
    return (
        isinstance(data, dict)
        and callable(data.get("func"))
        and isinstance(data.get("args"), tuple)
        and isinstance(data.get("kwargs"), dict)
        and isinstance(data.get("is_async"), bool)
    )


def is_sync(task: object) -> bool:
    """Whether the task runs in the threadpool, as far as can be told without running it."""
    try:
        is_async = getattr(task, "is_async", None)
    except Exception:
        return False
    return is_async is False


def framework_operation(task: object) -> Any:
    """The context FastAPI's own ``BackgroundTasks`` loop opens around each task.

    FastAPI (>= 0.142) wraps each task in ``fastapi.background_task`` span when its
    telemetry traces the request. taskscope runs inside that same context, so that with
    FastAPI's telemetry on the task's span is FastAPI's (in the provider FastAPI uses for
    the app), and with it off nothing changes. ``None`` when FastAPI is not loaded or has
    no such hook, or the task has no ``func`` (a collection: FastAPI would fail on it).
    """
    module = sys.modules.get("fastapi.background")
    operation = getattr(module, "_operation", None) if module is not None else None
    if operation is None:
        return None
    func = getattr(task, "func", None)
    if func is None:
        return None
    return operation(name="background_task", function=func)
