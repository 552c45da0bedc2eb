"""Loop stalls: what the watchdog samples, whom it blames, and where.

Nothing here runs per step or per task. The watchdog thread of a loop probe
(:mod:`taskscope._probe`) calls :func:`blame` when the loop has not serviced its heartbeat
for longer than the threshold (a stall) and, at a low rate, to estimate each task's busy
time. Blame comes from the loop thread as it is *now*:

- asyncio and uvloop: the loop's current task (``asyncio.current_task(loop)`` reads the
  tasks dict, from any thread) and the :data:`current_run` in that task's context. A
  background task's own code runs in the task that awaits it, where
  :func:`taskscope._probe.monitored` set :data:`current_run`; children started with
  ``asyncio.gather``, ``create_task``, asyncio/anyio task groups inherit it (a task copies
  the context it is created in). The context is ``Task.get_context()`` on 3.12+, the first
  ``Context`` the task references on 3.11 (the C task's ``tp_traverse`` visits it first).
- trio: the task whose root coroutine is the outermost coroutine frame of the loop thread's
  stack, found in the task tree from the root task (nurseries' children), and the
  :data:`current_run` of its ``context``.

No run: the code running is not a background task's (an endpoint, a loop callback, the
loop's own scheduling of many short steps) and the stall is reported as such
(:data:`OUTSIDE`), never on a task that merely is in flight.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import os
import sys
import time
import weakref
from typing import TYPE_CHECKING, Any

from taskscope._record import OUTSIDE_TASKS, BlockRecord
from taskscope._safe import code_location_attributes, safe_text

if TYPE_CHECKING:
    from types import FrameType

    from taskscope._run import TaskRun
    from taskscope._runtime import Runtime

# The taskscope task whose code is running; inherited by child tasks (gather, task groups).
current_run: contextvars.ContextVar[TaskRun | None] = contextvars.ContextVar(
    "taskscope_current_run", default=None
)

# The probe measures real time whatever clock a Telemetry carries: one loop is shared by
# every Telemetry that runs tasks on it. (Module global: patched by tests.)
clock = time.perf_counter

OUTSIDE = OUTSIDE_TASKS

_STACK_DEPTH = 8
_MAX_FRAMES = 128
_MAX_TREE = 10_000  # trio tasks visited to find the running one
_CO_COROUTINE = 0x80  # inspect.CO_COROUTINE


class Stall:
    """One stall of the loop: the heartbeat due at ``due`` has not run (yet).

    Opened by the watchdog once the heartbeat is ``threshold`` late; blamed on what ran then.
    ``reported`` holds, per runtime told, the run blamed (``None``: outside its tasks) and
    the ongoing record sent. ``duration`` is set when the stall ends (``ended``).
    """

    __slots__ = (
        "due",
        "duration",
        "ended",
        "half_beat",
        "location",
        "reported",
        "run",
        "stack",
        "wall",
    )

    def __init__(
        self, due: float, run: TaskRun | None, location: str, stack: tuple[str, ...]
    ) -> None:
        self.due = due
        self.run = run
        self.location = location
        self.stack = stack
        self.reported: list[tuple[Runtime, TaskRun | None, BlockRecord]] = []
        self.ended = False
        self.duration = 0.0
        self.half_beat = 0.0  # the stall began up to a beat before ``due``: half on average
        # Wall-clock start (ns): the span event's timestamp.
        self.wall = time.time_ns() - int((clock() - due) * 1e9)


def context_of(task: Any) -> contextvars.Context | None:
    """The context an asyncio task's steps run in (readable from another thread)."""
    get = getattr(task, "get_context", None)  # 3.12+
    if get is not None:
        context: contextvars.Context = get()
        return context
    own = getattr(task, "_context", None)  # the pure-Python Task
    if isinstance(own, contextvars.Context):
        return own
    for referent in gc.get_referents(task):  # the C Task of 3.11: its context comes first
        if type(referent) is contextvars.Context:
            return referent
    return None


class Blamer:
    """Finds the background task running on one loop thread, from another thread."""

    def __init__(self, library: str, loop_thread: int, loop: Any, root_task: Any) -> None:
        self.library = library
        self.loop_thread = loop_thread
        self.loop = loop
        self.root_task = root_task  # trio: the task tree's root
        self._trio_tasks: dict[int, weakref.ref[Any]] = {}  # root frame id -> trio task

    def run_now(self) -> TaskRun | None:
        """The run whose code holds the loop now (busy sampling: no stack unless trio)."""
        if self.library != "trio":
            task = asyncio.current_task(self.loop)
            if task is None:
                return None
            context = context_of(task)
            return None if context is None else context.get(current_run)
        frame = sys._current_frames().get(self.loop_thread)
        if frame is None:
            return None
        task = self._trio_task(_outermost_coroutine(frame))
        return None if task is None else task.context.get(current_run)

    def blame(self) -> tuple[TaskRun | None, list[FrameType]] | None:
        """The run holding the loop now (``None``: not a background task) and the frames
        of what runs, outermost first (from the running task's coroutine inward).

        ``None`` if no code holds the loop: it is stopped (asyncio between two
        ``run_until_complete``), or waits in its selector, or (trio) runs no task, as when
        a guest run's host thread waits: a heartbeat that is late then was woken late (CPU
        contention, a guest run's host), which is not a stall caused by code.
        """
        frame = sys._current_frames().get(self.loop_thread)
        if frame is None:
            return None
        run: TaskRun | None = None
        root: FrameType | None = None
        if self.library != "trio":
            loop = self.loop
            if loop is not None and not loop.is_running():
                return None
            task = asyncio.current_task(loop)
            if task is not None:
                context = context_of(task)
                run = None if context is None else context.get(current_run)
                root = getattr(task.get_coro(), "cr_frame", None)
            elif frame.f_code.co_filename.startswith(_loop_machinery()):
                return None  # waiting in the selector, or between two callbacks
        else:
            root = _outermost_coroutine(frame)
            if root is None:
                return None  # no task runs: the scheduler, or the I/O wait
            task = self._trio_task(root)
            if task is not None:
                run = task.context.get(current_run)
        return run, _running_frames(frame, root)

    def _trio_task(self, root: FrameType | None) -> Any:
        if root is None:
            return None
        cached = self._trio_tasks.get(id(root))
        task = cached() if cached is not None else None
        if task is not None and getattr(task.coro, "cr_frame", None) is root:
            return task
        found = None
        pending = [self.root_task]
        for _ in range(_MAX_TREE):
            if not pending:
                break
            task = pending.pop()
            if getattr(task.coro, "cr_frame", None) is root:
                found = task
                break
            for nursery in tuple(task.child_nurseries):
                pending.extend(tuple(nursery.child_tasks))
        if found is not None:
            if len(self._trio_tasks) > 1024:
                self._trio_tasks.clear()
            self._trio_tasks[id(root)] = weakref.ref(found)
        return found


_machinery: tuple[str, ...] = ()


def _loop_machinery() -> tuple[str, ...]:
    """Source paths of the asyncio loop itself: its package, ``selectors``, uvloop."""
    global _machinery  # noqa: PLW0603 - computed once
    if not _machinery:
        import selectors

        paths = [os.path.join(os.path.dirname(asyncio.__file__), ""), selectors.__file__]
        uvloop = sys.modules.get("uvloop")
        if uvloop is not None and getattr(uvloop, "__file__", None):
            paths.append(os.path.join(os.path.dirname(str(uvloop.__file__)), ""))
        _machinery = tuple(paths)
    return _machinery


def _outermost_coroutine(frame: FrameType) -> FrameType | None:
    """The outermost coroutine frame of a stack: a trio task's root coroutine (trio's
    runner, a generator, sends into it)."""
    found = None
    current: FrameType | None = frame
    for _ in range(_MAX_FRAMES * 2):
        if current is None:
            break
        if current.f_code.co_flags & _CO_COROUTINE:
            found = current
        current = current.f_back
    return found


def add_span_events(run: TaskRun) -> None:
    """The ``loop.blocked`` span events of the stalls blamed on ``run`` (loop thread, as
    the task ends: before its span does), timestamped when each stall started."""
    span = run.span
    stalls = run.stalls
    if span is None or not stalls:
        return
    now = clock()
    # A stall can begin before the task's span did (the heartbeat was due, then the task
    # started and blocked): its event is never placed before the span's start.
    span_start = getattr(span, "start_time", None)
    for stall in tuple(stalls):
        duration = stall.duration if stall.ended else now - stall.due + stall.half_beat
        try:
            span.add_event(
                "loop.blocked",
                {
                    "taskscope.block.duration": duration,  # seconds
                    # file paths can hold lone surrogates (undecodable bytes): escaped
                    **code_location_attributes(stall.location),
                    "taskscope.block.sampled": True,
                    "taskscope.block.stack": [safe_text(line) for line in stall.stack],
                },
                timestamp=stall.wall if span_start is None else max(stall.wall, span_start),
            )
        except Exception:
            run.runtime.absorb("tracing")


# -- locations -----------------------------------------------------------------------------
def _running_frames(frame: FrameType, root: FrameType | None) -> list[FrameType]:
    """The loop thread's frames from the running task's coroutine (``root``) inward,
    outermost first. Without ``root`` on the stack (a loop callback): the whole stack."""
    frames: list[FrameType] = []
    current: FrameType | None = frame
    while current is not None and len(frames) < _MAX_FRAMES:
        frames.append(current)
        if current is root:
            break
        current = current.f_back
    frames.reverse()
    return frames


def describe(frames: list[FrameType]) -> tuple[str, tuple[str, ...]]:
    """``(location, stack)`` of the frames that ran (outermost first).

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
        # The standard library is where ``os`` lives (importing ``sysconfig`` here would
        # take ~70 ms, in the watchdog thread, holding the import lock and the GIL).
        stdlib = {os.path.join(os.path.dirname(os.__file__), "")}
        sysconfig = sys.modules.get("sysconfig")
        if sysconfig is not None:
            paths = sysconfig.get_paths()
            stdlib.update(
                os.path.join(paths[k], "") for k in ("stdlib", "platstdlib") if k in paths
            )
        self.stdlib = tuple(stdlib)
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
