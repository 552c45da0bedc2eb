"""Per-step timing of async tasks: the stretch between two suspensions of a coroutine.

The loop thread marks the step that holds the loop (``StepMonitor.current``: one reference
store per step boundary); the watchdog thread reads it and, once a step is past its
threshold, samples the loop thread's stack. Steps are told apart by ``(step, started)``:
``started`` is written before ``current``, so a reader that sees the same pair twice saw
one step.
"""

from __future__ import annotations

import collections.abc
import contextvars
import os
import sys
import threading
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Protocol

from taskscope._record import BlockRecord
from taskscope._safe import code_location_attributes, safe_text

if TYPE_CHECKING:
    from types import FrameType

    from taskscope._run import TaskRun

# The taskscope task whose code is running; inherited by child tasks (gather, task groups).
current_run: contextvars.ContextVar[TaskRun | None] = contextvars.ContextVar(
    "taskscope_current_run", default=None
)

# The probe measures real time whatever clock a Telemetry carries: one loop is shared by
# every Telemetry that runs tasks on it. (Module global: the fastest lookup on the hot path.)
clock = time.perf_counter

_STACK_DEPTH = 8
_LATE = 0.001  # the watchdog wakes this long after a step would cross its threshold
_MAX_FRAMES = 128


class Step(Protocol):
    """What the monitor and the watchdog read of the step holding the loop."""

    run: TaskRun
    started: float
    threshold: float
    coro: Any


class StepMonitor:
    """The step currently holding one event loop, shared with that loop's watchdog.

    Written on the loop thread at every step boundary (reference stores), read by the
    watchdog thread. Only steps longer than their threshold take the lock.
    """

    __slots__ = ("current", "lock", "loop_thread", "reported", "reported_at", "reported_step")

    def __init__(self, loop_thread: int) -> None:
        self.loop_thread = loop_thread
        self.current: Step | None = None
        self.reported_step: Step | None = None
        self.reported_at = 0.0
        self.reported: BlockRecord | None = None
        self.lock = threading.Lock()

    # -- loop thread -----------------------------------------------------------------
    def enter(self, step: Step) -> Step | None:
        """Start timing ``step``; returns the step it interrupts (nested steps), if any."""
        outer = self.current
        step.started = clock()
        self.current = step
        return outer

    def exit(self, step: Step, outer: Step | None) -> None:
        """End ``step`` (entered with :meth:`enter`), resuming ``outer``."""
        start = step.started
        elapsed = clock() - start
        self.current = outer
        step.run.busy += elapsed
        if elapsed >= step.threshold or outer is not None:
            self.step_ended(step, start, elapsed, outer)

    def step_ended(self, step: Step, start: float, elapsed: float, outer: Step | None) -> None:
        """The rare end of a step: it blocked the loop, or it interrupted another step."""
        if outer is not None:
            # The outer step's share up to the inner one; it resumes now. (Its block
            # threshold counts from here: an inner task's time is not the outer's.)
            outer.run.busy += start - outer.started
            outer.started = start + elapsed
        if elapsed >= step.threshold:
            self.slow_step_ended(step, start, elapsed)

    def slow_step_ended(self, step: Step, started: float, elapsed: float) -> None:
        """A step held the loop past its threshold: record it (loop thread, after the step)."""
        run = step.run
        with self.lock:
            reported = None
            if self.reported_step is step and self.reported_at == started:
                reported = self.reported
            self.reported_step = None
            self.reported = None
        run.blocks += 1
        if reported is not None:
            location, stack, sampled = reported.location, reported.stack, True
        else:
            # No sample (the blocking call held the GIL, or the step was shorter than a
            # watchdog poll): where the step's coroutine is suspended now, or for one that
            # finished, the function that ran.
            location, stack = describe(_suspended_frames(step.coro))
            if not stack:
                location = _code_location(step.coro)
            sampled = False
        block = BlockRecord(
            run.name, elapsed, location, stack, sampled, False, run.trace_id, run.span_id
        )
        _add_span_event(run, block)
        run.runtime.block_ended(block, reported=reported is not None)

    # -- watchdog thread -----------------------------------------------------------------
    def sample(self, idle: float) -> float:
        """Report the running step if it is past its threshold (once per step).

        Returns the seconds to wait before the next look: until the running step would
        cross its threshold, else ``idle`` (at most the smallest threshold, so that a step
        starting right after this look is seen before it crosses its own).
        """
        step = self.current
        if step is None:
            return idle
        started = step.started
        if step is not self.current:
            return 0.0  # changed while we read: look again
        elapsed = clock() - started
        if elapsed < step.threshold:
            return min(idle, step.threshold - elapsed + _LATE)
        if self.reported_step is step and self.reported_at == started:
            return idle
        coro = step.coro
        frame = sys._current_frames().get(self.loop_thread)
        if frame is None or not getattr(coro, "cr_running", True):
            return _LATE  # between steps (the loop is in scheduling code): nothing to blame
        location, stack = describe(_running_frames(frame, getattr(coro, "cr_frame", None)))
        run = step.run
        block = BlockRecord(
            run.name, elapsed, location, stack, True, True, run.trace_id, run.span_id
        )
        with self.lock:
            if self.current is not step or step.started != started:
                return 0.0  # the step ended while we looked: the loop side records it
            if self.reported_step is step and self.reported_at == started:
                return idle
            self.reported_step, self.reported_at, self.reported = step, started, block
            # Inside the lock: the loop side records the step's end after this report.
            run.runtime.block_detected(block)
        return idle


def _add_span_event(run: TaskRun, block: BlockRecord) -> None:
    span = run.span
    if span is None:
        return
    try:
        span.add_event(
            "loop.blocked",
            {
                "taskscope.block.duration": block.duration,  # seconds
                # file paths can hold lone surrogates (undecodable bytes): escaped
                **code_location_attributes(block.location),
                "taskscope.block.sampled": block.sampled,
                "taskscope.block.stack": [safe_text(line) for line in block.stack],
            },
        )
    except Exception:
        run.runtime.absorb("tracing")


# -- locations -----------------------------------------------------------------------------
def _running_frames(frame: FrameType, root: FrameType | None) -> list[FrameType]:
    """The loop thread's frames from the step's coroutine (``root``) inward, outermost first.

    Without ``root`` on the stack (a trio task's step before its coroutine resumed): the
    whole stack.
    """
    frames: list[FrameType] = []
    current: FrameType | None = frame
    while current is not None and len(frames) < _MAX_FRAMES:
        frames.append(current)
        if current is root:
            break
        current = current.f_back
    frames.reverse()
    return frames


def _suspended_frames(coro: Any) -> list[FrameType]:
    """Frames of a suspended coroutine chain (``await`` by ``await``), outermost first."""
    frames: list[FrameType] = []
    for _ in range(_MAX_FRAMES):
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        frames.append(frame)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        if coro is None:
            break
    return frames


def describe(frames: list[FrameType]) -> tuple[str, tuple[str, ...]]:
    """``(location, stack)`` of a step's frames (outermost first).

    The stack keeps the innermost frames as ``file:line in function`` without the event
    loop's and taskscope's own. The location is the innermost frame of the app's code:
    not the standard library, then not an installed package either, else the innermost.
    """
    kinds = _PathKinds.get()
    kept: list[tuple[str, int]] = []
    lines: list[str] = []
    for frame in frames:
        code = frame.f_code
        filename = code.co_filename
        kind = kinds.kind(filename)
        if kind == _SKIP:
            continue
        location = f"{filename}:{frame.f_lineno}"
        kept.append((location, kind))
        lines.append(f"{location} in {code.co_name}")
    if not kept:
        return "<unknown>", ()
    location = kept[-1][0]
    for wanted in (_APP, _INSTALLED):
        found = next((loc for loc, kind in reversed(kept) if kind <= wanted), None)
        if found is not None:
            location = found
            break
    return location, tuple(lines[-_STACK_DEPTH:])


_APP, _INSTALLED, _STDLIB, _SKIP = 0, 1, 2, 3


class _PathKinds:
    """Classifies source files: app code, installed package, standard library, machinery."""

    _instance: _PathKinds | None = None

    def __init__(self) -> None:
        import sysconfig

        paths = sysconfig.get_paths()
        self.stdlib = tuple(
            {os.path.join(paths[k], "") for k in ("stdlib", "platstdlib") if k in paths}
        )
        here = os.path.dirname(os.path.abspath(__file__))
        skip = [os.path.join(here, "_")]
        for module in ("asyncio", "anyio", "trio", "sniffio", "outcome", "uvloop"):
            spec = sys.modules.get(module)
            path = getattr(spec, "__file__", None) if spec is not None else None
            if path:
                skip.append(os.path.join(os.path.dirname(path), ""))
        self.skip = tuple(skip)
        self.cache: dict[str, int] = {}

    @classmethod
    def get(cls) -> _PathKinds:
        kinds = cls._instance
        if kinds is None:
            kinds = cls._instance = _PathKinds()
        return kinds

    def kind(self, filename: str) -> int:
        found = self.cache.get(filename)
        if found is None:
            found = self._classify(filename)
            if len(self.cache) < 4096:
                self.cache[filename] = found
        return found

    def _classify(self, filename: str) -> int:
        if filename.startswith((*self.skip, "<frozen")):
            return _SKIP
        if "site-packages" in filename or "dist-packages" in filename:
            return _INSTALLED
        if filename.startswith((*self.stdlib, "<")):
            return _STDLIB
        return _APP


def _code_location(coro: Any) -> str:
    code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
    if code is None:
        return "<unknown>"
    return f"{code.co_filename}:{code.co_firstlineno}"


# -- the asyncio side: a coroutine wrapper -----------------------------------------------
class TimedCoroutine(collections.abc.Coroutine[Any, Any, Any]):
    """Wraps a coroutine; every ``send``/``throw`` into it is one timed step.

    Awaited by :func:`taskscope._probe.monitored` for a task's own coroutine, and what the
    asyncio task factory wraps child tasks in, so it is a real ``Coroutine`` (passes
    ``asyncio.iscoroutine``) and exposes the ``cr_*`` attributes. ``send`` is the hot
    path: :meth:`StepMonitor.enter`/:meth:`StepMonitor.exit` inlined.
    """

    __slots__ = ("coro", "monitor", "run", "started", "threshold")

    def __init__(self, coro: Any, run: TaskRun, monitor: StepMonitor) -> None:
        self.coro = coro
        self.run = run
        self.monitor = monitor
        self.threshold = run.threshold
        self.started = 0.0

    def send(self, value: Any = None) -> Any:
        monitor = self.monitor
        outer = monitor.current
        self.started = start = clock()  # before ``current``: see the module docstring
        monitor.current = self
        try:
            return self.coro.send(value)
        finally:
            elapsed = clock() - start
            monitor.current = outer
            self.run.busy += elapsed
            if elapsed >= self.threshold or outer is not None:
                monitor.step_ended(self, start, elapsed, outer)

    __next__ = send

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        monitor = self.monitor
        outer = monitor.enter(self)
        try:
            if val is None and tb is None:
                return self.coro.throw(typ)
            return self.coro.throw(typ, val, tb)  # pragma: no cover - legacy signature
        finally:
            monitor.exit(self, outer)

    def close(self) -> None:
        self.coro.close()

    def __await__(self) -> Generator[Any, None, Any]:
        return self

    def __iter__(self) -> TimedCoroutine:
        return self

    # Introspection used by asyncio, anyio, trio and debuggers.
    @property
    def cr_frame(self) -> Any:
        return getattr(self.coro, "cr_frame", None)

    @property
    def cr_running(self) -> bool:
        return bool(getattr(self.coro, "cr_running", False))

    @property
    def cr_await(self) -> Any:
        return getattr(self.coro, "cr_await", None)

    @property
    def cr_code(self) -> Any:
        return getattr(self.coro, "cr_code", None)

    @property
    def cr_suspended(self) -> bool:
        return bool(getattr(self.coro, "cr_suspended", False))

    def __repr__(self) -> str:
        return f"<taskscope timed {self.coro!r}>"
