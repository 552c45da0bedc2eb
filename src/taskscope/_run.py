"""Running a response's tasks: one span, one record, one outcome per task."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import threading
import warnings
from collections.abc import Callable, Sequence
from time import time
from types import FunctionType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
from opentelemetry import context as otel_context
from opentelemetry import trace

from taskscope._naming import _NAME_ATTRIBUTE, callable_name
from taskscope._probe import enter_run, exit_run, monitored, probe_for, start_watchdog
from taskscope._record import Outcome, TaskRecord
from taskscope._runtime import DRAIN_EVERY, Runtime, current_telemetry, resolve, runtime_of
from taskscope._safe import qualified_type_name, safe_message
from taskscope._spans import (  # the task span
    _adopt_span,
    _end_span,
    _start_span,
)
from taskscope._spans import finish_span as finish_span  # noqa: PLC0414 (re-exported)
from taskscope._spans import start_task_span as start_task_span  # noqa: PLC0414
from taskscope._stepping import current_run
from taskscope._task_kinds import Kind, framework_hook, framework_operation, is_sync, kind_of

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span
    from starlette.background import BackgroundTask

    from taskscope._config import Telemetry

_INTERRUPTIONS = (KeyboardInterrupt, GeneratorExit, asyncio.CancelledError)


class Capture:
    """What ``add_task`` captures: the OTel context and, if scoped, the telemetry.

    The process default telemetry and the bounded task name are resolved when the task
    runs, so creating tasks touches no global state.
    """

    __slots__ = ("_name", "accounted", "context", "func", "kind", "telemetry")

    def __init__(
        self, func: Callable[..., Any], telemetry: Telemetry | None, context: Context
    ) -> None:
        self.func = func
        self.telemetry = telemetry
        self.context = context
        self._name: str | None = None
        self.accounted = False  # run_tasks took it: it will end in an outcome there
        self.kind = Kind.PLAIN  # how it runs: set when run_tasks takes it

    def resolve(self, explicit: Telemetry | None) -> Telemetry:
        if self.telemetry is None:
            self.telemetry = resolve(explicit)
        return self.telemetry

    @property
    def name(self) -> str:
        name = self._name
        if name is None:
            name = self._name = runtime_of(self.resolve(None)).task_name(self.func, _name_of)
        return name


# callable_name() of plain functions, keyed by everything its result depends on (so
# functools.wraps wrappers sharing a code object stay apart). Bounded: past the cap,
# names are computed each time, as before.
_NAME_CACHE_SIZE = 4096
_names_by_key: dict[tuple[Any, ...], str] = {}


def _name_of(func: Callable[..., Any]) -> str:
    if type(func) is not FunctionType:
        return callable_name(func)
    try:
        key = (
            func.__code__,
            func.__module__,
            func.__qualname__,
            func.__dict__.get(_NAME_ATTRIBUTE),
        )
        name = _names_by_key.get(key)
    except Exception:  # unhashable explicit name and the like: the uncached path decides
        return callable_name(func)
    if name is None:
        name = callable_name(func)
        if len(_names_by_key) < _NAME_CACHE_SIZE:
            _names_by_key[key] = name
    return name


def capture(func: Callable[..., Any], explicit: Telemetry | None) -> Capture:
    return Capture(
        func,
        explicit if explicit is not None else current_telemetry.get(),
        otel_context.get_current(),
    )


def capture_of(task: BackgroundTask, explicit: Telemetry | None) -> Capture:
    found = getattr(task, "_taskscope", None)
    if type(found) is Capture:
        if found.telemetry is None:
            found.resolve(explicit)
        return found
    # A plain Starlette task (instrument()/instrument_app() paths), or an object with its
    # own __call__: captured at run time, named after its func (or itself, if it has none).
    try:
        func = getattr(task, "func", task)
    except Exception:
        func = task
    cap = capture(func, explicit)
    cap.resolve(explicit)
    return cap


class TaskRun:
    """Mutable state of one task while it runs (read by the loop probe and the hung check).

    Built for every task: only what differs per task is set in ``__init__``, the rest are
    class defaults until written (a plain instance with three attributes is about half
    the cost of fourteen slots).
    """

    busy = 0.0
    blocks = 0
    span: Span | None = None
    owns_span = True  # False: the framework's span (FastAPI's), enriched only
    trace_id: str | None = None
    span_id: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    # Read by the hung-task check (watchdog thread): where the task waits.
    coro: Any = None  # async: the task's coroutine (awaitable)
    thread: int | None = None  # sync: the worker thread running it (0: done there)
    hung = 0  # back-off steps reported as hung (0: never)
    # Loop stalls blamed on this task (the probe's watchdog appends; rare).
    stalls: list[Any] | None = None

    def __init__(self, name: str, runtime: Runtime, threshold: float | None = None) -> None:
        self.name = name
        self.runtime = runtime
        self.threshold = runtime.telemetry.block_threshold if threshold is None else threshold


# The task a custom ``__call__`` is being recorded for: when that ``__call__`` calls
# ``super().__call__()``, taskscope's own ``__call__`` runs Starlette's, not a second record.
recording_opaque: contextvars.ContextVar[object] = contextvars.ContextVar(
    "taskscope_recording_opaque", default=None
)


async def run_tasks(
    tasks: Sequence[BackgroundTask],
    explicit: Telemetry | None = None,
    *,
    continue_on_error: bool | None = None,
) -> None:
    """Run tasks one after another, as Starlette does, recording each one's outcome.

    Like Starlette's loop over ``self.tasks``, a task appended while the tasks run (by a
    task itself) runs too, and is accounted for from the moment it is seen. A collection
    nested in ``tasks`` runs its own tasks in its turn, each recorded.
    """
    if not tasks:
        return
    captures: list[Capture | None] = []
    _account(tasks, captures, explicit)
    first = _first_telemetry(captures, explicit)
    keep_going = first.continue_on_error if continue_on_error is None else continue_on_error
    clock = first.clock
    sent_at = clock()
    hook = framework_hook()
    # The batched hot path (``lean``): plain async tasks of ``first``'s runtime, when its
    # only counting sink is the in-process Prometheus collector and the framework opens no
    # per-task context for this request (FastAPI without telemetry): per task a TaskRun,
    # two clock reads, the in-flight entry, the span if tracing, and one append to the
    # collector's queue (aggregated at scrape). Every other task takes ``run_one``.
    runtime = first._runtime or runtime_of(first)
    lean = runtime.batching and (hook is None or _no_framework_context(hook, tasks, captures))
    if lean:
        inflight = runtime.inflight
        pending = runtime.prometheus.pending
        threshold = first.block_threshold
        probing = first.loop_probe and probe_for(runtime) is not None
        tracing = runtime.tracing
    error: Exception | None = None
    index = 0
    try:
        while index < len(tasks):
            if error is not None and not keep_going:
                break
            try:
                cap = captures[index]
                task = tasks[index]
                if cap is None:  # a nested collection: Starlette awaits it in its turn
                    await _run_nested(task, explicit, keep_going)
                elif lean and cap.kind is Kind.PLAIN and cap.telemetry is first and task.is_async:
                    name = cap.name  # computed by _account, cached on the capture
                    run = TaskRun(name, runtime, threshold)
                    key = id(task)
                    start = clock()
                    # Runtime.run_started/run_ended, inlined: a batching runtime has no
                    # sink keeping its own in-progress gauge to tell.
                    inflight[key] = (name, start, run)
                    span = (
                        _start_span(runtime, run, cap, False, start - sent_at) if tracing else None
                    )
                    token = current_run.set(run) if probing else None
                    try:
                        run.coro = coro = task.func(*task.args, **task.kwargs)
                        await coro
                    except BaseException as exc:
                        _lean_ended_badly(run, key, exc, start, sent_at, token, span)
                        raise
                    end = clock()
                    inflight.pop(key, None)
                    if token is not None:
                        exit_run(run, token)
                    if run.span is not None:
                        _end_span(runtime, run, span, "success", None)
                    if run.hung or runtime.exited:  # the full record (which knows exit)
                        _lean_record(run, key, "success", end - start, start - sent_at)
                    elif run.trace_id is None:
                        pending.append((name, end - start, start - sent_at, run.busy, None, 0.0))
                    else:  # the exemplar's trace, and when it was seen
                        pending.append(
                            (name, end - start, start - sent_at, run.busy, run.trace_id, time())
                        )
                else:
                    await run_one(task, cap, sent_at, hook)
            except Exception as exc:
                if error is None:
                    error = exc
            index += 1
            if len(tasks) > len(captures):
                _account(tasks, captures, explicit)
    except BaseException:
        # Cancelled (shutdown) or interrupted: the tasks that never started are abandoned.
        _account(tasks, captures, explicit)
        _record_not_run(tasks[index + 1 :], captures[index + 1 :], "abandoned", explicit)
        raise
    finally:
        if lean and len(pending) >= DRAIN_EVERY:
            runtime.drain()
    if index < len(tasks):
        _record_not_run(tasks[index:], captures[index:], "skipped", explicit)
    if error is not None:
        raise error


def _no_framework_context(
    hook: Any, tasks: Sequence[BackgroundTask], captures: list[Capture | None]
) -> bool:
    """Whether FastAPI opens no context around this response's tasks (its telemetry does
    not trace the request). Asked once per response, with its first plain task: the
    request's telemetry is in the OTel context the tasks share."""
    for task, cap in zip(tasks, captures, strict=False):
        if cap is not None and cap.kind is Kind.PLAIN:
            try:
                return framework_operation(hook, task) is None
            except Exception:  # FastAPI's telemetry failing: run_one absorbs it per task
                return False
    return False


def _lean_ended_badly(  # noqa: PLR0917 - the hot path's state, passed as it is
    run: TaskRun,
    key: int,
    exc: BaseException,
    start: float,
    sent_at: float,
    token: contextvars.Token[Any] | None,
    span: object,
) -> None:
    """A task of the batched hot path raised: recorded as ``run_one`` records it."""
    runtime = run.runtime
    outcome = _outcome_of(exc)
    run.error_type = qualified_type_name(exc)
    run.error_message = safe_message(exc, runtime.telemetry)
    end = runtime.telemetry.clock()
    if token is not None:
        exit_run(run, token)
    if run.span is not None:
        _end_span(runtime, run, span, outcome, exc)
    _lean_record(run, key, outcome, end - start, start - sent_at)


def _lean_record(run: TaskRun, key: int, outcome: Outcome, duration: float, wait: float) -> None:
    """The full record of a batched-path task (a failure, or reported by the watchdog)."""
    runtime = run.runtime
    runtime.inflight.pop(key, None)
    runtime.record(_record_of(run, outcome, False, duration, wait))


def _record_of(
    run: TaskRun,
    outcome: Outcome,
    sync: bool,
    duration: float,
    wait: float,
    *,
    thread_wait: float | None = None,
) -> TaskRecord:
    """A task's full record, from what its run collected (errors, ids, busy time, hang)."""
    return TaskRecord(
        run.name,
        outcome,
        sync,
        duration,
        wait,
        thread_wait,
        run.error_type,
        run.error_message,
        run.trace_id,
        run.span_id,
        run.busy,
        run.blocks,
        None,
        run.hung > 0,  # reported as hung by the watchdog
    )


def _first_telemetry(captures: list[Capture | None], explicit: Telemetry | None) -> Telemetry:
    for cap in captures:
        if cap is not None:
            return cap.resolve(explicit)
    return resolve(explicit)


async def _run_nested(
    collection: BackgroundTask, explicit: Telemetry | None, keep_going: bool
) -> None:
    inner = list(getattr(collection, "tasks", ()) or ())
    with contextlib.suppress(Exception):  # taskscope's collection: ran, not lost
        collection._called = True  # type: ignore[attr-defined]
    await run_tasks(inner, explicit, continue_on_error=keep_going)


def _account(
    tasks: Sequence[BackgroundTask], captures: list[Capture | None], explicit: Telemetry | None
) -> None:
    """Capture and track the tasks not seen yet: from now on each ends in an outcome."""
    for task in tasks[len(captures) :]:
        kind = kind_of(task)
        if kind is Kind.NESTED:
            captures.append(None)  # its tasks are accounted for when it runs
            continue
        cap = capture_of(task, explicit)  # resolved
        cap.kind = kind
        cap.accounted = True
        telemetry = cap.telemetry or cap.resolve(explicit)
        runtime = telemetry._runtime or runtime_of(telemetry)
        runtime.track(id(task), cap.name, None)  # tracked: an outcome is due
        captures.append(cap)


def record_never_run(tasks: Sequence[BackgroundTask], explicit: Telemetry | None) -> None:
    """Tasks of a ``BackgroundTasks`` that was never run: the endpoint raised after
    ``add_task``, or the response carried other background tasks. Starlette drops them
    silently; they are recorded as ``skipped`` so every task added ends in an outcome."""
    pending: list[BackgroundTask] = []
    captures: list[Capture | None] = []
    for task in tasks:
        if kind_of(task) is Kind.NESTED:
            pending.append(task)
            captures.append(None)
        elif not (cap := capture_of(task, explicit)).accounted:
            pending.append(task)
            captures.append(cap)
    if pending:
        _record_not_run(
            pending, captures, "skipped", explicit, reason="the response carrying it was never sent"
        )


def _record_not_run(
    tasks: Sequence[BackgroundTask],
    captures: Sequence[Capture | None],
    outcome: Outcome,
    explicit: Telemetry | None,
    *,
    reason: str | None = None,
    depth: int = 0,
) -> None:
    for task, cap in zip(tasks, captures, strict=True):
        if cap is None:  # a nested collection that never ran: each of its tasks
            if depth < _MAX_NESTING:
                inner = list(getattr(task, "tasks", ()) or ())
                with contextlib.suppress(Exception):
                    task._called = True  # type: ignore[attr-defined]
                inner_caps: list[Capture | None] = [
                    None if kind_of(t) is Kind.NESTED else capture_of(t, explicit) for t in inner
                ]
                _record_not_run(
                    inner, inner_caps, outcome, explicit, reason=reason, depth=depth + 1
                )
            continue
        runtime = runtime_of(cap.resolve(explicit))
        runtime.untrack(id(task))
        span_context = trace.get_current_span(cap.context).get_span_context()
        trace_id = format(span_context.trace_id, "032x") if span_context.is_valid else None
        runtime.record(
            TaskRecord(
                cap.name,
                outcome,
                is_sync(task),
                0.0,
                None,
                trace_id=trace_id,
                reason=reason,
            )
        )


_MAX_NESTING = 32


async def run_one(task: BackgroundTask, cap: Capture, sent_at: float, hook: Any = None) -> None:
    """Run one task; record exactly one outcome; re-raise unchanged.

    Runs inside the context FastAPI's own loop opens around each task (its span, when its
    telemetry traces the request): the task's span is FastAPI's then, else taskscope's own.
    The common case (a plain async task, no span) costs two clock reads, the task put in
    flight and taken out (two dict operations), one record and its aggregation.
    """
    telemetry = cap.telemetry or cap.resolve(None)
    runtime = telemetry._runtime or runtime_of(telemetry)
    clock = telemetry.clock
    name = cap.name
    run = TaskRun(name, runtime, telemetry.block_threshold)
    plain = cap.kind is Kind.PLAIN
    sync = (not task.is_async) if plain else is_sync(task)
    start = clock()
    runtime.run_started(id(task), name, start, run)  # in flight: gauges, hung check, exit
    operation = None if hook is None else _enter_framework_operation(hook, task, run)
    token = None
    if run.span is None and runtime.tracing:
        token = _start_span(runtime, run, cap, sync, start - sent_at)
    outcome: Outcome = "success"
    error: BaseException | None = None
    thread_started: list[float] = []
    try:
        if not plain:
            await _run_opaque(task, run)
        elif sync:
            await _run_sync(task, run, thread_started, clock)
        else:
            run.coro = coro = task.func(*task.args, **task.kwargs)
            probing = enter_run(run)  # the loop probe: who runs (no code per step)
            try:
                await coro
            finally:
                exit_run(run, probing)
    except BaseException as exc:
        error = exc
        outcome = _outcome_of(exc)
        run.error_type = qualified_type_name(exc)  # one form everywhere: span, label, log
        run.error_message = safe_message(exc, telemetry)
        raise
    finally:
        end = clock()
        # Sync tasks: run time counts from the worker thread's start (the wait for a free
        # thread is recorded separately); never started in a thread: it did not run.
        if thread_started:
            ran_from = thread_started[0]
        elif sync and plain:
            ran_from = end
        else:
            ran_from = start
        runtime.run_ended(id(task), name)
        if run.owns_span and run.span is not None:
            _end_span(runtime, run, token, outcome, error)
        if outcome == "success" and not thread_started and not run.hung and not sync:
            runtime.async_success(
                name, end - start, start - sent_at, run.trace_id, run.span_id, run.busy, run.blocks
            )
        else:
            thread_wait = (thread_started[0] - start) if thread_started else None
            record = _record_of(
                run, outcome, sync, end - ran_from, start - sent_at, thread_wait=thread_wait
            )
            runtime.record(record)
        if operation is not None:  # FastAPI's span ends after the task's record is made
            if error is None:
                operation.__exit__(None, None, None)
            else:
                operation.__exit__(type(error), error, error.__traceback__)


def _enter_framework_operation(hook: Any, task: BackgroundTask, run: TaskRun) -> Any:
    """Open the context FastAPI's loop opens around a task; adopt the span it starts."""
    try:
        operation = framework_operation(hook, task)
        if operation is None:
            return None
        before = trace.get_current_span()
        operation.__enter__()
    except Exception:  # FastAPI's telemetry failing must not cost the task
        run.runtime.absorb("tracing")
        return None
    current = trace.get_current_span()
    if current is not before:
        _adopt_span(run, current)
    return operation


async def _run_opaque(task: BackgroundTask, run: TaskRun) -> None:
    """A task with its own ``__call__``: awaited as Starlette would, inside the record."""
    token = recording_opaque.set(task)
    try:
        run.coro = coro = task()
        await monitored(coro, run)
    finally:
        recording_opaque.reset(token)


def _outcome_of(exc: BaseException) -> Outcome:
    if isinstance(exc, Exception):
        return "failure"
    if isinstance(exc, (anyio.get_cancelled_exc_class(), _INTERRUPTIONS)):
        return "cancelled"
    return "failure"  # SystemExit and other BaseExceptions raised by the task itself


async def _run_sync(
    task: BackgroundTask, run: TaskRun, thread_started: list[float], clock: Callable[[], float]
) -> None:
    func, args, kwargs = task.func, task.args, task.kwargs
    unawaited: list[Any] = []

    def in_worker_thread() -> None:
        thread_started.append(clock())
        run.thread = threading.get_ident()
        try:
            result = func(*args, **kwargs)
        finally:
            run.thread = 0  # done in the thread (0: no thread has this id)
        if inspect.isawaitable(result):  # kept off the backend (trio would raise on it)
            unawaited.append(result)

    if run.runtime.telemetry.hung_after is not None:
        start_watchdog(run.runtime)  # the hung check lives with the loop probe's watchdog
    await anyio.to_thread.run_sync(in_worker_thread)
    if unawaited:
        _flag_unawaited(unawaited[0], run)


def _flag_unawaited(result: Any, run: TaskRun) -> None:
    """A sync callable returned a coroutine: Starlette would drop it silently."""
    if inspect.iscoroutine(result):
        result.close()  # it will never run; closing avoids a second, vaguer warning
    run.runtime.warning(run.name, "coroutine_not_awaited", trace_id=run.trace_id)
    warnings.warn(
        f"background task {run.name} is a sync callable that returned an awaitable; "
        "it was not awaited (declare it `async def` to run it)",
        RuntimeWarning,
        stacklevel=1,
    )
