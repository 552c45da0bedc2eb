"""Per-step timing of async tasks: the stretch between two suspensions of a coroutine."""

from __future__ import annotations

import collections.abc
import contextvars
import sys
import threading
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from taskscope._record import BlockRecord

if TYPE_CHECKING:
    from types import FrameType

    from taskscope._run import TaskRun

# The taskscope task whose code is running; inherited by child tasks (gather, task groups).
current_run: contextvars.ContextVar[TaskRun | None] = contextvars.ContextVar(
    "taskscope_current_run", default=None
)

_STACK_DEPTH = 8


class StepMonitor:
    """The step currently holding one event loop, shared with that loop's watchdog.

    Written on the loop thread at every step (plain attribute stores), read by the
    watchdog thread. Only steps longer than the threshold take the lock.
    """

    def __init__(self, clock: Callable[[], float], loop_thread: int) -> None:
        self.clock = clock
        self.loop_thread = loop_thread
        self.run: TaskRun | None = None
        self.started = 0.0
        self.step_id = 0
        self.reported_id = -1
        self.reported: BlockRecord | None = None
        self.lock = threading.Lock()

    def enter(self, run: TaskRun) -> tuple[TaskRun | None, float]:
        outer = self.run, self.started
        now = self.clock()
        if outer[0] is not None:  # a nested step: close the outer one's share first
            outer[0].busy += now - outer[1]
        self.step_id += 1
        self.run = run
        self.started = now
        return outer

    def exit(self, outer: tuple[TaskRun | None, float], coro: Any = None) -> None:
        run, started = self.run, self.started
        now = self.clock()
        self.run = None
        if run is not None:
            elapsed = now - started
            run.busy += elapsed
            if elapsed >= run.threshold:
                self._slow_step_ended(run, elapsed, coro)
        if outer[0] is not None:
            self.step_id += 1
            self.run, self.started = outer[0], now

    def _slow_step_ended(self, run: TaskRun, elapsed: float, coro: Any) -> None:
        with self.lock:
            reported = self.reported if self.reported_id == self.step_id else None
            self.reported_id = self.step_id
            self.reported = None
        run.blocks += 1
        if reported is not None:
            location, stack, sampled = reported.location, reported.stack, True
        else:
            # No sample (the blocking call held the GIL): where the step ended, or
            # for a finished coroutine, the function that ran.
            stack = _stack_of(innermost_frame(coro))
            location = _blame(stack) if stack else _code_location(coro)
            sampled = False
        block = BlockRecord(
            run.name, elapsed, location, stack, sampled, False, run.trace_id, run.span_id
        )
        _add_span_event(run, block)
        run.runtime.block_ended(block, reported=reported is not None)

    def sample(self) -> None:
        """Watchdog side: report the running step if it is past its threshold."""
        run, started, step_id = self.run, self.started, self.step_id
        if run is None:
            return
        elapsed = self.clock() - started
        if elapsed < run.threshold or self.reported_id == step_id:
            return
        frame = sys._current_frames().get(self.loop_thread)  # noqa: SLF001
        stack = _stack_of(frame)
        if self.step_id != step_id:
            return  # the step ended while we looked: the loop side reports it
        location = _blame(stack)
        block = BlockRecord(
            run.name, elapsed, location, stack, True, True, run.trace_id, run.span_id
        )
        with self.lock:
            if self.step_id != step_id or self.reported_id == step_id:
                return
            self.reported_id = step_id
            self.reported = block
        run.runtime.block_detected(block)


def _add_span_event(run: TaskRun, block: BlockRecord) -> None:
    span = run.span
    if span is None:
        return
    try:
        span.add_event(
            "loop.blocked",
            {
                "taskscope.block.duration_s": block.duration,
                "code.location": block.location,
                "taskscope.block.sampled": block.sampled,
                "taskscope.block.stack": list(block.stack),
            },
        )
    except Exception:
        run.runtime.absorb("tracing")


_SKIP_PARTS = ("/taskscope/_stepping.py", "/taskscope/_probe.py", "/asyncio/", "/anyio/", "/trio/")


def _stack_of(frame: FrameType | None) -> tuple[str, ...]:
    """Innermost frames as ``file:line in function``, outermost first."""
    lines: list[str] = []
    while frame is not None and len(lines) < 64:
        code = frame.f_code
        lines.append(f"{code.co_filename}:{frame.f_lineno} in {code.co_name}")
        frame = frame.f_back
    lines.reverse()
    kept = [line for line in lines if not any(part in line for part in _SKIP_PARTS)]
    return tuple((kept or lines)[-_STACK_DEPTH:])


def _blame(stack: tuple[str, ...]) -> str:
    """The innermost frame of the app's own code (not the stdlib or site-packages)."""
    for line in reversed(stack):
        path = line.rsplit(" in ", 1)[0]
        if not _is_library(path):
            return path
    return stack[-1].rsplit(" in ", 1)[0] if stack else "<unknown>"


def _is_library(path: str) -> bool:
    return (
        "/site-packages/" in path
        or "/dist-packages/" in path
        or path.startswith(_STDLIB)
        or path.startswith("<")
    )


def _stdlib_prefix() -> str:
    import sysconfig

    return sysconfig.get_paths()["stdlib"] + "/"


_STDLIB = _stdlib_prefix()


def _code_location(coro: Any) -> str:
    code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
    if code is None:
        return "<unknown>"
    return f"{code.co_filename}:{code.co_firstlineno}"


def innermost_frame(coro: Any) -> FrameType | None:
    """Where a suspended coroutine chain is waiting (for step-end fallback locations)."""
    frame = None
    for _ in range(64):
        f = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if f is None:
            break
        frame = f
        nxt = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        if nxt is None:
            break
        coro = nxt
    return frame


class TimedCoroutine(collections.abc.Coroutine[Any, Any, Any]):
    """Wraps a coroutine; every ``send``/``throw`` into it is one timed step.

    Also serves as what asyncio's task factory wraps child tasks in, so it is a real
    ``Coroutine`` (passes ``asyncio.iscoroutine``) and exposes the ``cr_*`` attributes.
    """

    __slots__ = ("_coro", "_monitor", "_run")

    def __init__(self, coro: Any, run: TaskRun, monitor: StepMonitor) -> None:
        self._coro = coro
        self._run = run
        self._monitor = monitor

    def __await__(self) -> Generator[Any, None, Any]:
        return self  # type: ignore[return-value]

    def __iter__(self) -> TimedCoroutine:
        return self

    def __next__(self) -> Any:
        return self.send(None)

    def send(self, value: Any) -> Any:
        monitor = self._monitor
        outer = monitor.enter(self._run)
        try:
            return self._coro.send(value)
        finally:
            monitor.exit(outer, self._coro)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:  # type: ignore[override]
        monitor = self._monitor
        outer = monitor.enter(self._run)
        try:
            if val is None and tb is None:
                return self._coro.throw(typ)
            return self._coro.throw(typ, val, tb)  # pragma: no cover - legacy signature
        finally:
            monitor.exit(outer, self._coro)

    def close(self) -> None:
        self._coro.close()

    # Introspection used by asyncio, anyio and debuggers.
    @property
    def cr_frame(self) -> Any:
        return getattr(self._coro, "cr_frame", None)

    @property
    def cr_running(self) -> bool:
        return bool(getattr(self._coro, "cr_running", False))

    @property
    def cr_await(self) -> Any:
        return getattr(self._coro, "cr_await", None)

    @property
    def cr_code(self) -> Any:
        return getattr(self._coro, "cr_code", None)

    @property
    def cr_suspended(self) -> bool:
        return bool(getattr(self._coro, "cr_suspended", False))

    def __repr__(self) -> str:
        return f"<taskscope timed {self._coro!r}>"
