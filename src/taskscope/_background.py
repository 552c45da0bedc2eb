"""The drop-in classes: real subclasses of Starlette's, instrumented in ``__call__``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec

from starlette.background import BackgroundTask as StarletteBackgroundTask
from starlette.background import BackgroundTasks as StarletteBackgroundTasks

from taskscope._config import DEFAULT_MAX_TASKS_PER_RESPONSE
from taskscope._run import capture, record_never_run, recording_opaque, run_tasks
from taskscope._runtime import runtime_of
from taskscope._task_kinds import own_collection_calls, own_task_calls

if TYPE_CHECKING:
    from taskscope._config import Telemetry


P = ParamSpec("P")

__all__ = ("BackgroundTask", "BackgroundTasks")


def _check_callable(func: object) -> None:
    if not callable(func):
        msg = (
            f"background task must be callable, got {type(func).__qualname__} "
            f"({_short_repr(func)}); pass the function itself, not its result"
        )
        raise TypeError(msg)


def _short_repr(obj: object) -> str:
    try:
        text = repr(obj)
    except Exception:
        return f"<{type(obj).__qualname__}>"
    return text if len(text) <= 60 else text[:57] + "..."


class BackgroundTask(StarletteBackgroundTask):
    """Starlette's ``BackgroundTask``, observed: a span, metrics and logs for its run."""

    def __init__(self, func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> None:
        _check_callable(func)
        super().__init__(func, *args, **kwargs)
        self._taskscope = capture(func, None)

    async def __call__(self) -> None:
        if recording_opaque.get() is self:
            # A subclass's own __call__ is being recorded and called super().__call__():
            # run the task as Starlette does, inside that record.
            await StarletteBackgroundTask.__call__(self)
            return
        await run_tasks([self])


class BackgroundTasks(StarletteBackgroundTasks):
    """Starlette's ``BackgroundTasks``, observed; same API, order and failure semantics.

    ``telemetry`` (keyword only) overrides the settings for the tasks of this object;
    otherwise those of :func:`taskscope.instrument_app` or the process default apply.
    """

    def __init__(
        self,
        tasks: Sequence[StarletteBackgroundTask] | None = None,
        *,
        telemetry: Telemetry | None = None,
    ) -> None:
        super().__init__(tasks)
        self._telemetry = telemetry
        self._warned_size = False
        self._called = False

    def add_task(self, func: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> None:
        _check_callable(func)
        task = BackgroundTask.__new__(BackgroundTask)
        StarletteBackgroundTask.__init__(task, func, *args, **kwargs)
        task._taskscope = cap = capture(func, self._telemetry)
        tasks = self.tasks
        tasks.append(task)
        telemetry = cap.telemetry  # None: the process default, not resolved yet
        limit = (
            DEFAULT_MAX_TASKS_PER_RESPONSE
            if telemetry is None
            else telemetry.max_tasks_per_response
        )
        if len(tasks) > limit and not self._warned_size:
            self._check_size(cap)

    def _check_size(self, cap: Any) -> None:
        telemetry = cap.resolve(self._telemetry)
        limit = telemetry.max_tasks_per_response
        if len(self.tasks) > limit:
            self._warned_size = True
            runtime_of(telemetry).warning(
                cap.name, "too_many_tasks", count=len(self.tasks), limit=limit
            )

    async def __call__(self) -> None:
        self._called = True
        await run_tasks(self.tasks, self._telemetry)

    def __del__(self) -> None:
        # Never called: the response was not sent (the endpoint raised after add_task) or
        # carried its own background. Starlette loses these tasks silently; record them.
        if getattr(self, "_called", True) or not getattr(self, "tasks", None):
            return
        with contextlib.suppress(Exception):  # a finalizer must never raise
            record_never_run(self.tasks, self._telemetry)


own_task_calls.add(BackgroundTask.__call__)
own_collection_calls.add(BackgroundTasks.__call__)
