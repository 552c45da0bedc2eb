"""Stable, bounded names for task callables: ``module.qualname``."""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from taskscope._safe import exact_str, safe_text

OTHER = "__other__"
UNKNOWN = "<unknown>"
UNNAMED = "<unnamed>"
_TYPE_QUALNAME = type.__dict__["__qualname__"]
_TYPE_MODULE = type.__dict__["__module__"]
_NAME_ATTRIBUTE = "__taskscope_name__"
F = TypeVar("F", bound=Callable[..., Any])


def task_name(name: str) -> Callable[[F], F]:
    """Give a task function an explicit metric/span name instead of ``module.qualname``.

    Names are identifiers of code, not data: never build one from request data (user
    ids, paths, messages). Whatever they carry, names are redacted (``Telemetry.redact``),
    escaped and truncated when first recorded, and bounded by ``max_task_names``.

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
    whatever a hostile object does in ``__getattr__``, ``__qualname__`` or ``__module__``
    (raise, return a non-string), it falls back to its type's name, read from the type's
    own slots. The result is an exact ``str`` (not yet cleaned: see :class:`NameLimiter`).
    """
    try:
        return _callable_name(func)
    except Exception:  # a hostile __getattr__ must not cost the task
        return _type_name(func)


def _callable_name(func: object) -> str:
    for _ in range(32):  # partial(partial(...)) chains, bounded
        explicit = getattr(func, _NAME_ATTRIBUTE, None)
        if isinstance(explicit, str):
            return exact_str(explicit)
        if isinstance(func, functools.partial):
            func = func.func
            continue
        if inspect.ismethod(func):
            explicit = getattr(func.__func__, _NAME_ATTRIBUTE, None)
            if isinstance(explicit, str):
                return exact_str(explicit)
            func = func.__func__
            continue
        break
    if inspect.isfunction(func) or inspect.isbuiltin(func):
        # A bound builtin (``items.append``) has no module of its own: its owner's type has.
        module = _text_attribute(func, "__module__") or _owner_module(func) or UNKNOWN
        qualname = _text_attribute(func, "__qualname__") or _text_attribute(func, "__name__") or "?"
        if qualname.endswith("<lambda>") and inspect.isfunction(func):
            qualname = f"{qualname}@{func.__code__.co_firstlineno}"
        return f"{module}.{qualname}"
    return _type_name(func)


def _text_attribute(obj: object, name: str) -> str | None:
    value = getattr(obj, name, None)
    return exact_str(value) if isinstance(value, str) else None


def _owner_module(func: object) -> str | None:
    """The module of a bound builtin's owner's type (``items.append``: ``builtins``)."""
    owner = getattr(func, "__self__", None)
    if owner is None or inspect.ismodule(owner):
        return None
    module = _TYPE_MODULE.__get__(type(owner))
    return exact_str(module) if isinstance(module, str) else None


def _type_name(obj: object) -> str:
    """``module.qualname`` of ``obj`` if it is a class, else of its class; never raises."""
    try:
        cls = obj if type in type(obj).__mro__ else type(obj)
        qualname = exact_str(_TYPE_QUALNAME.__get__(cls))
        module = _TYPE_MODULE.__get__(cls)
        module = exact_str(module) if isinstance(module, str) else UNKNOWN
        return f"{module}.{qualname}"
    except Exception:  # pragma: no cover - the type slots are always readable
        return UNNAMED


# Longest recorded task name (characters); longer ones are truncated at admission.
MAX_NAME_LENGTH = 200


class NameLimiter:
    """Admits task names as label values: cleaned, redacted, bounded.

    A name is user data like any other (``@task_name`` built from request data, a class
    with a generated ``__qualname__``), so every new name is, once: turned into an exact
    ``str``, passed through ``redact`` (``Telemetry.redact``), made encodable on one line
    (control characters and lone surrogates escaped, see :func:`taskscope._safe.safe_text`)
    and truncated to :data:`MAX_NAME_LENGTH`. Past ``limit`` distinct names, new ones are
    ``__other__``; ``on_overflow`` is called for each task so named.
    """

    def __init__(
        self,
        limit: int,
        *,
        redact: Callable[[str], str] | None = None,
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        self._limit = limit
        self._redact = redact
        self._on_overflow = on_overflow
        self._seen: set[str] = set()
        # raw name -> admitted name; bounded (past it, new raw names are cleaned each time)
        self._known: dict[str, str] = {}
        self._known_cap = max(4 * limit, 1024)
        self._lock = threading.Lock()
        self.overflows = 0
        """Tasks named ``__other__`` because the cap was reached."""

    def admit(self, name: object) -> str:
        if type(name) is str:
            known = self._known.get(name)
            if known is not None:
                if known is OTHER:
                    self._overflowed()
                return known
        raw = exact_str(name) if isinstance(name, str) else safe_text(name)
        clean = self.clean(raw)
        with self._lock:
            if clean in self._seen:
                admitted = clean
            elif len(self._seen) >= self._limit:
                admitted = OTHER
            else:
                self._seen.add(clean)
                admitted = clean
            if len(self._known) < self._known_cap:
                self._known[raw] = admitted
        if admitted is OTHER:
            self._overflowed()
        return admitted

    def clean(self, name: str) -> str:
        """The name as it may be recorded: redacted, encodable, one line, bounded."""
        if self._redact is not None:
            try:
                redacted = self._redact(name)
            except Exception:
                redacted = "<redaction failed>"
            name = redacted if isinstance(redacted, str) else "<redaction failed>"
        name = safe_text(name, single_line=True, max_length=MAX_NAME_LENGTH)
        if name == OTHER:
            return name  # the overflow name itself (e.g. already admitted elsewhere)
        return name or UNNAMED

    def _overflowed(self) -> None:
        self.overflows += 1
        if self._on_overflow is not None:
            with contextlib.suppress(Exception):  # counting must not cost the task
                self._on_overflow()

    def __len__(self) -> int:
        return len(self._seen)


class ErrorTypeLimiter:
    """Bounds ``error_type`` label values: per task and overall (task, error_type) pairs.

    Values are cleaned like names (one line, encodable, bounded). Past ``per_task``
    distinct error types of one task, or ``overall`` distinct pairs, new ones are
    ``__other__``; ``on_overflow(task)`` is called for each failure so recorded.
    """

    def __init__(
        self,
        per_task: int,
        overall: int,
        *,
        on_overflow: Callable[[str], None] | None = None,
    ) -> None:
        self._per_task = per_task
        self._overall = overall
        self._on_overflow = on_overflow
        self._pairs: set[tuple[str, str]] = set()
        self._count_by_task: dict[str, int] = {}
        self._lock = threading.Lock()
        self.overflows = 0

    def admit(self, task: str, error_type: object) -> str:
        clean = safe_text(error_type, single_line=True, max_length=MAX_NAME_LENGTH) or UNNAMED
        pair = (task, clean)
        if pair in self._pairs:
            return clean
        with self._lock:
            if pair in self._pairs:
                return clean
            count = self._count_by_task.get(task, 0)
            if clean != OTHER and count < self._per_task and len(self._pairs) < self._overall:
                self._pairs.add(pair)
                self._count_by_task[task] = count + 1
                return clean
            self.overflows += 1
        if self._on_overflow is not None:
            with contextlib.suppress(Exception):  # counting must not cost the task
                self._on_overflow(task)
        return OTHER

    def __len__(self) -> int:
        return len(self._pairs)
