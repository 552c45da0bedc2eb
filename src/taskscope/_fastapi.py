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
from collections.abc import Callable
from types import ModuleType
from typing import Any

_TARGET = "fastapi.dependencies.utils"
_lock = threading.Lock()
_hook: _RebindOnImport | None = None
_bound: type | None = None
_want_rebind = False
# Who wants the rebind: "import" (the drop-in class was imported: for good) and
# "instrument" (instrument()/instrument_app(): until uninstrument()).
_reasons: set[str] = set()
_pending: list[Callable[[], None]] = []  # run once FastAPI is loaded


def ensure_bound(reason: str = "import") -> None:
    """Rebind now if FastAPI is loaded, or as soon as it is (one-shot import hook)."""
    global _want_rebind  # noqa: PLW0603 - process-wide, like the rebind itself
    with _lock:
        _reasons.add(reason)
        module = sys.modules.get(_TARGET)
        if module is not None:
            _rebind(module)
        else:
            _want_rebind = True
            _install_hook()


def when_loaded(callback: Callable[[], None]) -> None:
    """Call ``callback`` now if FastAPI is loaded, or right after it is imported."""
    with _lock:
        loaded = _TARGET in sys.modules
        if not loaded and callback not in _pending:
            _pending.append(callback)
            _install_hook()
    if loaded:
        callback()


def cancel_when_loaded(callback: Callable[[], None]) -> None:
    with _lock:
        if callback in _pending:
            _pending.remove(callback)
        if not _pending and not _want_rebind:
            _remove_hook()


def unbind(reason: str | None = None) -> None:
    """Undo :func:`ensure_bound` for ``reason``; FastAPI's own class is back once no reason
    is left (``None``: every reason, for tests or users who want FastAPI's class back)."""
    global _want_rebind  # noqa: PLW0603
    with _lock:
        if reason is None:
            _reasons.clear()
        else:
            _reasons.discard(reason)
        if _reasons:
            return
        _want_rebind = False
        if not _pending:
            _remove_hook()
        module = sys.modules.get(_TARGET)
        if module is not None and _bound is not None and module.BackgroundTasks is _bound:
            import fastapi.background

            module.BackgroundTasks = fastapi.background.BackgroundTasks  # type: ignore[attr-defined]


def _install_hook() -> None:
    global _hook  # noqa: PLW0603
    if _hook is None:
        _hook = _RebindOnImport()
        sys.meta_path.insert(0, _hook)


def _remove_hook() -> None:
    global _hook  # noqa: PLW0603
    if _hook is not None and _hook in sys.meta_path:
        sys.meta_path.remove(_hook)
    _hook = None


def _loaded(module: ModuleType) -> None:
    """``fastapi.dependencies.utils`` was just imported: rebind, run the callbacks."""
    global _want_rebind  # noqa: PLW0603
    with _lock:
        _remove_hook()
        if _want_rebind:
            _want_rebind = False
            _rebind(module)
        callbacks = list(_pending)
        _pending.clear()
    for callback in callbacks:
        callback()


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
        _loaded(module)
