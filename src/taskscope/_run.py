"""Running a response's tasks: one span, one record, one outcome per task."""

from __future__ import annotations

import asyncio
import inspect
import warnings
from collections.abc import Callable, Sequence
from types import FunctionType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from taskscope._naming import _NAME_ATTRIBUTE, callable_name
from taskscope._probe import monitored
from taskscope._record import Outcome, TaskRecord
from taskscope._runtime import Runtime, current_telemetry, resolve, runtime_of

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

    __slots__ = ("_name", "accounted", "context", "func", "telemetry")

    def __init__(
        self, func: Callable[..., Any], telemetry: Telemetry | None, context: Context
    ) -> None:
        self.func = func
        self.telemetry = telemetry
        self.context = context
        self._name: str | None = None
        self.accounted = False  # run_tasks took it: it will end in an outcome there

    def resolve(self, explicit: Telemetry | None) -> Telemetry:
        if self.telemetry is None:
            self.telemetry = resolve(explicit)
        return self.telemetry

    @property
    def name(self) -> str:
        if self._name is None:
            telemetry = self.resolve(None)
            self._name = runtime_of(telemetry).names.admit(_name_of(self.func))
        return self._name


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
    if isinstance(found, Capture):
        found.resolve(explicit)
        return found
    # A plain Starlette task (instrument()/instrument_app() paths): capture at run time.
    cap = capture(task.func, explicit)
    cap.resolve(explicit)
    return cap


class TaskRun:
    """Mutable state of one task while it runs (read by the loop probe)."""

    __slots__ = ("blocks", "busy", "name", "runtime", "span", "span_id", "threshold", "trace_id")

    def __init__(self, name: str, runtime: Runtime) -> None:
        self.name = name
        self.runtime = runtime
        self.threshold = runtime.telemetry.block_threshold
        self.busy = 0.0
        self.blocks = 0
        self.span: Span | None = None
        self.trace_id: str | None = None
        self.span_id: str | None = None


async def run_tasks(
    tasks: Sequence[BackgroundTask],
    explicit: Telemetry | None = None,
    *,
    continue_on_error: bool | None = None,
) -> None:
    """Run tasks one after another, as Starlette does, recording each one's outcome.

    Like Starlette's loop over ``self.tasks``, a task appended while the tasks run (by a
    task itself) runs too, and is accounted for from the moment it is seen.
    """
    if not tasks:
        return
    captures: list[Capture] = []
    _account(tasks, captures, explicit)
    first = captures[0].resolve(explicit)
    keep_going = first.continue_on_error if continue_on_error is None else continue_on_error
    sent_at = first.clock()
    error: Exception | None = None
    index = 0
    try:
        while index < len(tasks):
            if error is not None and not keep_going:
                break
            try:
                await run_one(tasks[index], captures[index], sent_at)
            except Exception as exc:
                if error is None:
                    error = exc
            index += 1
            if len(tasks) > len(captures):
                _account(tasks, captures, explicit)
    except BaseException:
        # Cancelled (shutdown) or interrupted: the tasks that never started are abandoned.
        _account(tasks, captures, explicit)
        _record_not_run(tasks[index + 1 :], captures[index + 1 :], "abandoned")
        raise
    if index < len(tasks):
        _record_not_run(tasks[index:], captures[index:], "skipped")
    if error is not None:
        raise error


def _account(
    tasks: Sequence[BackgroundTask], captures: list[Capture], explicit: Telemetry | None
) -> None:
    """Capture and track the tasks not seen yet: from now on each ends in an outcome."""
    for task in tasks[len(captures) :]:
        cap = capture_of(task, explicit)
        cap.accounted = True
        runtime_of(cap.resolve(explicit)).track(id(task), cap.name, 0.0)
        captures.append(cap)


def record_never_run(tasks: Sequence[BackgroundTask], explicit: Telemetry | None) -> None:
    """Tasks of a ``BackgroundTasks`` that was never run: the endpoint raised after
    ``add_task``, or the response carried other background tasks. Starlette drops them
    silently; they are recorded as ``skipped`` so every task added ends in an outcome."""
    pending = [(task, cap) for task in tasks if not (cap := capture_of(task, explicit)).accounted]
    if pending:
        _record_not_run(
            [task for task, _ in pending],
            [cap for _, cap in pending],
            "skipped",
            reason="the response carrying it was never sent",
        )


def _record_not_run(
    tasks: Sequence[BackgroundTask],
    captures: list[Capture],
    outcome: Outcome,
    reason: str | None = None,
) -> None:
    for task, cap in zip(tasks, captures, strict=True):
        runtime = runtime_of(cap.resolve(None))
        runtime.untrack(id(task))
        span_context = trace.get_current_span(cap.context).get_span_context()
        trace_id = format(span_context.trace_id, "032x") if span_context.is_valid else None
        runtime.record(
            TaskRecord(
                cap.name,
                outcome,
                not getattr(task, "is_async", True),
                0.0,
                None,
                trace_id=trace_id,
                reason=reason,
            )
        )


async def run_one(task: BackgroundTask, cap: Capture, sent_at: float) -> None:
    """Run one task inside its span; record exactly one outcome; re-raise unchanged."""
    telemetry = cap.resolve(None)
    runtime = runtime_of(telemetry)
    clock = telemetry.clock
    name = cap.name
    run = TaskRun(name, runtime)
    sync = not task.is_async
    start = clock()
    runtime.track(id(task), name, start)
    span, token = _start_span(runtime, run, cap, sync, start - sent_at)
    runtime.task_started(name)
    outcome: Outcome = "success"
    error: BaseException | None = None
    thread_started: list[float] = []
    try:
        if sync:
            await _run_sync(task, run, thread_started, clock)
        else:
            await monitored(task.func(*task.args, **task.kwargs), run)
    except BaseException as exc:
        error = exc
        outcome = _outcome_of(exc)
        raise
    finally:
        end = clock()
        # Sync tasks: run time counts from the worker thread's start (the wait for a free
        # thread is recorded separately); never started in a thread: it did not run.
        ran_from = thread_started[0] if thread_started else (end if sync else start)
        runtime.untrack(id(task))
        runtime.task_finished(name)
        error_type = error_message = None
        if error is not None:
            error_type = type(error).__name__
            error_message = safe_message(error, telemetry)
        if span is not None:
            _end_span(runtime, span, token, outcome, error, error_type, error_message)
        runtime.record(
            TaskRecord(
                name,
                outcome,
                sync,
                end - ran_from,
                start - sent_at,
                thread_wait=(thread_started[0] - start) if thread_started else None,
                error_type=error_type,
                error_message=error_message,
                trace_id=run.trace_id,
                span_id=run.span_id,
                loop_busy=run.busy,
                loop_blocks=run.blocks,
            )
        )


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
        result = func(*args, **kwargs)
        if inspect.isawaitable(result):  # kept off the backend (trio would raise on it)
            unawaited.append(result)

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


def safe_message(error: BaseException, telemetry: Telemetry) -> str:
    """``str(error)``, truncated and redacted; never raises."""
    limit = telemetry.max_message_length
    try:
        text = str(error)
    except BaseException:
        text = f"<unprintable {type(error).__name__}>"
    if not isinstance(text, str):
        text = f"<unprintable {type(error).__name__}>"
    # Redact before truncating (a cut can split a secret from the text that marks it,
    # e.g. the "@" of a connection URL), on a bounded prefix so the cost stays bounded.
    try:
        redacted = telemetry.redact(text[: limit * 4])
    except Exception:
        return "<redaction failed>"
    if not isinstance(redacted, str):
        return "<redaction failed>"
    if len(redacted) > limit or len(text) > limit * 4:
        redacted = redacted[:limit] + "…[truncated]"
    return redacted


def _start_span(
    runtime: Runtime, run: TaskRun, cap: Capture, sync: bool, wait: float
) -> tuple[Span | None, object]:
    try:
        tracer = runtime.tracer
        if tracer is None:
            return None, None
        parent_context: Context | None = cap.context
        links: list[Link] | None = None
        if runtime.telemetry.span_mode == "link":
            parent = trace.get_current_span(cap.context).get_span_context()
            links = [Link(parent)] if parent.is_valid else None
            parent_context = otel_context.Context()
        span = tracer.start_span(
            f"background_task {run.name}",
            context=parent_context,
            kind=SpanKind.INTERNAL,
            attributes={
                "code.function.name": run.name,
                "taskscope.task.sync": sync,
                "taskscope.task.wait_s": wait,
            },
            links=links,
        )
        span_context = span.get_span_context()
        if span_context.is_valid:
            run.trace_id = format(span_context.trace_id, "032x")
            run.span_id = format(span_context.span_id, "016x")
        run.span = span
        token = otel_context.attach(trace.set_span_in_context(span, cap.context))
        return span, token
    except Exception:
        runtime.absorb("tracing")
        return None, None


def _end_span(  # noqa: PLR0917 - private, called once
    runtime: Runtime,
    span: Span,
    token: object,
    outcome: Outcome,
    error: BaseException | None,
    error_type: str | None,
    error_message: str | None,
) -> None:
    try:
        if token is not None:
            otel_context.detach(token)  # type: ignore[arg-type]
    except Exception:
        runtime.absorb("tracing")
    try:
        span.set_attribute("taskscope.task.outcome", outcome)
        if error is not None and outcome == "failure":
            cls = type(error)
            qualified = (
                cls.__qualname__
                if cls.__module__ == "builtins"
                else f"{cls.__module__}.{cls.__qualname__}"
            )
            span.set_attribute("error.type", qualified)
            span.add_event(
                "exception",
                {
                    "exception.type": qualified,
                    "exception.message": error_message or "",
                    "exception.escaped": True,
                },
            )
            span.set_status(Status(StatusCode.ERROR, error_type))
        elif error is not None:
            span.set_attribute("taskscope.task.interrupted_by", error_type or "")
        span.end()
    except Exception:
        runtime.absorb("tracing")
