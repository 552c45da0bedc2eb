"""Make FastAPI build taskscope's ``BackgroundTasks`` for ``BackgroundTasks`` parameters.

FastAPI creates its own ``fastapi.BackgroundTasks()`` in ``fastapi.dependencies.utils``
whatever subclass a parameter is annotated with, and shares that one object between the
path operation and its (sub-)dependencies. Rebinding that module's name to a subclass of
both taskscope's and FastAPI's class instruments every task added anywhere in the request,
at zero per-request cost, with ``isinstance`` checks against all three classes still true.

The rebind is version-guarded: it only replaces FastAPI's own class (never a class someone
else put there) and is skipped, with a warning, if FastAPI's layout changes.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
import warnings
from types import ModuleType
from typing import Any

_TARGET = "fastapi.dependencies.utils"
_lock = threading.Lock()
_hook: _RebindOnImport | None = None
_bound: type | None = None


def ensure_bound() -> None:
    """Rebind now if FastAPI is loaded, or as soon as it is (one-shot import hook)."""
    global _hook  # noqa: PLW0603 - process-wide, like the rebind itself
    with _lock:
        module = sys.modules.get(_TARGET)
        if module is not None:
            _rebind(module)
        elif _hook is None:
            _hook = _RebindOnImport()
            sys.meta_path.insert(0, _hook)


def unbind() -> None:
    """Undo :func:`ensure_bound` (tests, or users who want FastAPI's own class back)."""
    global _hook  # noqa: PLW0603
    with _lock:
        if _hook is not None and _hook in sys.meta_path:
            sys.meta_path.remove(_hook)
        _hook = None
        module = sys.modules.get(_TARGET)
        if module is not None and _bound is not None and module.BackgroundTasks is _bound:
            import fastapi.background

            module.BackgroundTasks = fastapi.background.BackgroundTasks  # type: ignore[attr-defined]


def fastapi_class() -> type:
    """taskscope's ``BackgroundTasks`` that is also a ``fastapi.BackgroundTasks``."""
    global _bound  # noqa: PLW0603
    if _bound is None:
        import fastapi.background

        from taskscope._background import BackgroundTasks

        _bound = type(
            "BackgroundTasks",
            (BackgroundTasks, fastapi.background.BackgroundTasks),
            {
                "__module__": "taskscope",
                "__qualname__": "BackgroundTasks",
                "__doc__": BackgroundTasks.__doc__,
            },
        )
    return _bound


def _rebind(module: ModuleType) -> None:
    import fastapi.background

    current = getattr(module, "BackgroundTasks", None)
    if current is fastapi_class():
        return
    if current is not fastapi.background.BackgroundTasks:
        warnings.warn(
            "taskscope: fastapi.dependencies.utils.BackgroundTasks is not FastAPI's own "
            "class (patched elsewhere, or an unsupported FastAPI); BackgroundTasks "
            "parameters are not instrumented. Use taskscope.instrument_app(app) instead.",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    module.BackgroundTasks = fastapi_class()  # type: ignore[attr-defined]


class _RebindOnImport(importlib.abc.MetaPathFinder):
    """Waits for ``fastapi.dependencies.utils`` to be imported, rebinds, then leaves."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, self)
                return spec
        return None


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any, hook: _RebindOnImport) -> None:
        self._inner = inner
        self._hook = hook

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self._inner.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        global _hook  # noqa: PLW0603
        with _lock:
            if self._hook in sys.meta_path:
                sys.meta_path.remove(self._hook)
            if _hook is self._hook:
                _hook = None
            _rebind(module)
