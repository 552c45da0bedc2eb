"""Stable, bounded names for task callables: ``module.qualname``."""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from typing import Any, TypeVar

OTHER = "__other__"
_NAME_ATTRIBUTE = "__taskscope_name__"
F = TypeVar("F", bound=Callable[..., Any])


def task_name(name: str) -> Callable[[F], F]:
    """Give a task function an explicit metric/span name instead of ``module.qualname``.

    >>> @task_name("emails.send_welcome")
    ... def send(address: str) -> None: ...
    """
    if not isinstance(name, str) or not name:
        msg = "task_name() needs a non-empty string"
        raise TypeError(msg)

    def decorate(func: F) -> F:
        setattr(func, _NAME_ATTRIBUTE, name)
        return func

    return decorate


def callable_name(func: object) -> str:
    """``module.qualname`` of a task callable.

    Unwraps ``functools.partial`` (and partialmethod), bound methods and callable
    objects; lambdas get their line number so two lambdas stay apart. Never raises:
    an unnamed object falls back to its type's name.
    """
    try:
        return _callable_name(func)
    except Exception:  # a hostile __getattr__ must not cost the task
        return _type_name(func)


def _callable_name(func: object) -> str:
    for _ in range(32):  # partial(partial(...)) chains, bounded
        explicit = getattr(func, _NAME_ATTRIBUTE, None)
        if isinstance(explicit, str):
            return explicit
        if isinstance(func, functools.partial):
            func = func.func
            continue
        if inspect.ismethod(func):
            explicit = getattr(func.__func__, _NAME_ATTRIBUTE, None)
            if isinstance(explicit, str):
                return explicit
            func = func.__func__
            continue
        break
    if inspect.isfunction(func) or inspect.isbuiltin(func):
        # A bound builtin (``items.append``) has no module of its own: its owner's type has.
        owner = getattr(func, "__self__", None)
        module = (
            getattr(func, "__module__", None)
            or (None if owner is None or inspect.ismodule(owner) else type(owner).__module__)
            or "<unknown>"
        )
        qualname = str(getattr(func, "__qualname__", None) or getattr(func, "__name__", "?"))
        if qualname.endswith("<lambda>") and inspect.isfunction(func):
            qualname = f"{qualname}@{func.__code__.co_firstlineno}"
        return f"{module}.{qualname}"
    if isinstance(func, type):
        return f"{func.__module__}.{func.__qualname__}"
    return _type_name(func)


def _type_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


class NameLimiter:
    """Keeps label values bounded: past ``limit`` distinct names, new ones are ``__other__``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def admit(self, name: str) -> str:
        if name in self._seen:
            return name
        with self._lock:
            if name in self._seen:
                return name
            if len(self._seen) >= self._limit:
                return OTHER
            self._seen.add(name)
            return name

    def __len__(self) -> int:
        return len(self._seen)
