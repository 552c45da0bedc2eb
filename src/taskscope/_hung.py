"""Hung tasks: a task still running past ``hung_after``, and where it is waiting.

Nothing here runs per task. A task's :class:`~taskscope._run.TaskRun` (already in its
in-flight entry) holds its coroutine, or for a sync task the worker thread running it;
the loop probe's watchdog thread scans the in-flight entries at a low rate and, for a
task past its due age, describes where it is suspended:

- async: the await chain of its coroutine (``cr_await``/``gi_yieldfrom``), through
  asyncio futures (a task awaited, ``asyncio.gather``'s children) and task groups
  (asyncio, anyio) or trio nurseries, to the pending children;
- sync: the worker thread's current stack (``sys._current_frames()``).
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any

from taskscope._record import HungRecord
from taskscope._safe import code_location_attributes, safe_text
from taskscope._stepping import _APP, _PathKinds

if TYPE_CHECKING:
    from taskscope._run import TaskRun
    from taskscope._runtime import Runtime

MAX_GAP = 600.0
"""Longest pause between two reports of one task (seconds)."""
_MAX_FRAMES = 128
_MAX_DEPTH = 4  # children of children of ...
_MAX_CHILDREN = 5  # pending children described per await
_MAX_LINES = 40
_GROUP_EXITS = frozenset({"__aexit__", "_aexit", "_nested_child_finished"})
WAITING_FOR_THREAD = "<waiting for a worker thread>"
LEFT_THREAD = "<returned from its worker thread>"


def due_age(hung_after: float, step: int) -> float:
    """Age at which a task is reported for the ``step``-th time (0: the first).

    The threshold, then a back-off that doubles the age, at most ``MAX_GAP`` apart:
    with 60 s, at 60, 120, 240, 480, 960, 1560, 2160 ... seconds.
    """
    age = hung_after
    for _ in range(step):
        age += min(age, MAX_GAP)
    return age


def scan_period(hung_after: float) -> float:
    """How often the watchdog scans the tasks in flight: 1/20 of the threshold, 1 s at most.

    The report comes at most this late (and a watchdog poll) after the threshold.
    """
    return min(max(hung_after / 20, 0.005), 1.0)


def check(runtime: Runtime) -> int:
    """Report the tasks of ``runtime`` that are due; returns how many were reported."""
    telemetry = runtime.telemetry
    hung_after = telemetry.hung_after
    if hung_after is None or not runtime.inflight:
        return 0
    entries = runtime.inflight.copy()  # one C call: atomic against the loop thread
    now = telemetry.clock()
    young = now - hung_after  # started after this: not due (the common case, one compare)
    reported = 0
    for key, entry in entries.items():
        start, run = entry[1], entry[2]
        if start is None or start > young or run is None:  # not started, not due, unwatched
            continue
        age = now - start
        step = run.hung
        if age < due_age(hung_after, step):
            continue
        with runtime.hung_lock:  # one report per due time, whichever watchdog saw it
            if run.hung != step or runtime.inflight.get(key) is not entry:
                continue
            while due_age(hung_after, step) <= age:
                step += 1
            run.hung = step
        _report(runtime, run, age, step)
        reported += 1
    return reported


def _report(runtime: Runtime, run: TaskRun, age: float, step: int) -> None:
    try:
        location, stack = where(run)
    except Exception:  # the task moved on while we read its frames
        runtime.absorb("loop_probe")
        location, stack = "<unknown>", ()
    hung = HungRecord(
        run.name,
        age,
        location,
        stack,
        run.coro is None,
        step,
        run.trace_id,
        run.span_id,
    )
    span = run.span
    if span is not None:
        try:
            attributes: dict[str, Any] = {
                "taskscope.task.age": age,  # seconds
                "taskscope.hung.report": step,
                **code_location_attributes(location),
                "taskscope.hung.stack": [safe_text(line) for line in stack],
            }
            span.add_event("task.hung", attributes)
        except Exception:
            runtime.absorb("tracing")
    runtime.hung_detected(hung)


# -- where a task waits ----------------------------------------------------------------
def where(run: TaskRun) -> tuple[str, tuple[str, ...]]:
    """``(location, stack)`` of a running task (see :class:`HungRecord`)."""
    if run.coro is None:
        thread = run.thread
        if thread == 0:  # its function returned: the task is about to end
            return LEFT_THREAD, ()
        frame = sys._current_frames().get(thread) if thread is not None else None
        if frame is None:
            return WAITING_FOR_THREAD, ()
        node = _Node(_thread_frames(frame), [])
    else:
        node = _walk(run.coro, 0)
    lines: list[str] = []
    _render(node, "", lines)
    location = _location(node) or "<unknown>"
    return location, tuple(lines[:_MAX_LINES])


class _Node:
    """One await chain (frames outermost first) and the pending children it waits on."""

    __slots__ = ("children", "frames")

    def __init__(self, frames: list[FrameType], children: list[tuple[str, _Node]]) -> None:
        self.frames = frames
        self.children = children


def _thread_frames(frame: FrameType) -> list[FrameType]:
    """A worker thread's frames, outermost first, from the task's function inward."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_run.py")
    frames: list[FrameType] = []
    current: FrameType | None = frame
    while current is not None and len(frames) < _MAX_FRAMES:
        code = current.f_code
        if code.co_name == "in_worker_thread" and code.co_filename == here:
            break  # taskscope's call of the task; the thread pool's frames are above it
        frames.append(current)
        current = current.f_back
    frames.reverse()
    return frames


def _walk(awaitable: Any, depth: int) -> _Node:
    frames: list[FrameType] = []
    children: list[tuple[str, _Node]] = []
    seen: set[int] = set()
    obj = awaitable
    last: Any = None  # the innermost coroutine or generator of the chain
    for _ in range(_MAX_FRAMES):
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "gi_frame", None)
        if frame is None:
            break  # not a coroutine: a future (or another awaitable), or done
        frames.append(frame)
        last = obj
        if depth < _MAX_DEPTH and frame.f_code.co_name in _GROUP_EXITS and _suspended(obj):
            _group_children(frame, depth, children, seen)
        obj = getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None)
        if obj is None:
            break
    if depth < _MAX_DEPTH:
        future = _future_of(obj, frames, last)
        if future is not None:
            _future_children(future, depth, children, seen)
    return _Node(frames, children)


def _suspended(obj: Any) -> bool:
    """Only a suspended frame's locals are read (never one running on the loop thread)."""
    return bool(getattr(obj, "cr_suspended", None) or getattr(obj, "gi_suspended", None))


def _future_of(obj: Any, frames: list[FrameType], last: Any) -> asyncio.Future[Any] | None:
    """The asyncio future at the end of a chain: awaited through the C ``FutureIter`` (its
    one referent), or through the pure-Python ``Future.__await__`` (its ``self``)."""
    if obj is not None:
        if asyncio.isfuture(obj):
            return obj
        if type(obj).__name__ == "FutureIter":
            for referent in gc.get_referents(obj):
                if asyncio.isfuture(referent):
                    return referent
        return None
    if frames and frames[-1].f_code.co_name == "__await__" and _suspended(last):
        owner = frames[-1].f_locals.get("self")
        if asyncio.isfuture(owner):
            return owner
    return None


def _future_children(
    future: asyncio.Future[Any], depth: int, out: list[tuple[str, _Node]], seen: set[int]
) -> None:
    """A task awaited directly, or the pending children of ``asyncio.gather``."""
    if _is_task(future):
        _add_asyncio_task(future, depth, out, seen)
        return
    for child in tuple(getattr(future, "_children", None) or ()):
        if _is_task(child):
            _add_asyncio_task(child, depth, out, seen)


def _is_task(obj: Any) -> bool:
    """An asyncio task (C or pure-Python, or a subclass): a future with a coroutine."""
    return asyncio.isfuture(obj) and hasattr(obj, "get_coro")


def _group_children(
    frame: FrameType, depth: int, out: list[tuple[str, _Node]], seen: set[int]
) -> None:
    """The pending children of a task group (asyncio, anyio) or trio nursery being exited."""
    owner = frame.f_locals.get("self")
    if owner is None:
        return
    tasks = getattr(owner, "_tasks", None)
    if isinstance(tasks, (set, list, dict)):
        for task in tuple(tasks):
            if _is_task(task):
                _add_asyncio_task(task, depth, out, seen)
    trio_tasks = getattr(owner, "child_tasks", None)
    if isinstance(trio_tasks, (frozenset, set)):
        for task in sorted(trio_tasks, key=lambda t: str(getattr(t, "name", ""))):
            if id(task) not in seen and len(out) < _MAX_CHILDREN:
                seen.add(id(task))
                out.append((str(getattr(task, "name", "task")), _walk(task.coro, depth + 1)))


def _add_asyncio_task(task: Any, depth: int, out: list[tuple[str, _Node]], seen: set[int]) -> None:
    if task.done() or id(task) in seen or len(out) >= _MAX_CHILDREN:
        return
    seen.add(id(task))
    out.append((task.get_name(), _walk(task.get_coro(), depth + 1)))


# -- rendering ---------------------------------------------------------------------------
def _location(node: _Node) -> str | None:
    """The innermost app frame, in the first pending child that has one, else here."""
    for _, child in node.children:
        found = _location(child)
        if found is not None:
            return found
    kinds = _PathKinds.get()
    fallback = None
    for frame in reversed(node.frames):
        location = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        if kinds.kind(frame.f_code.co_filename) == _APP:
            return location
        fallback = fallback or location
    return fallback


def _render(node: _Node, indent: str, lines: list[str]) -> None:
    """Children first (they are where the waiting happens), then the chain, innermost first.

    A run of library frames (standard library, installed packages, asyncio/trio/anyio,
    taskscope) is collapsed into its outermost frame: the call the app made.
    """
    for label, child in node.children:
        lines.append(f"{indent}child {label}:")
        _render(child, indent + "  ", lines)
    kinds = _PathKinds.get()
    collapsed = 0
    entries: list[str] = []
    for frame in reversed(node.frames):  # innermost first
        code = frame.f_code
        text = f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"
        if kinds.kind(code.co_filename) != _APP:
            if collapsed:
                entries.pop()
            collapsed += 1
            more = collapsed - 1
            suffix = "" if not more else f" (+{more} library frame{'s' if more > 1 else ''})"
            entries.append(text + suffix)
            continue
        collapsed = 0
        entries.append(text)
    lines.extend(indent + entry for entry in entries)
