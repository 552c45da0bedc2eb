"""taskscope for taskiq: the same metrics, spans and log events for tasks run by workers.

::

    from taskscope.taskiq import TaskscopeMiddleware

    broker = ListQueueBroker("redis://localhost:6379").with_middlewares(TaskscopeMiddleware())

Sending stamps each message's labels with its publish time and the W3C trace context (a
``publish {task}`` PRODUCER span); the worker runs each task in a ``background_task {task}``
CONSUMER span continuing that trace and records one outcome per run into the same
``taskscope_*`` metrics as in-process tasks. Task names come from the task name taskiq
sends (``module:function`` is recorded as ``module.function``, as in-process names are):
taskiq renames the function it wraps. In a worker process the loop probe measures
event-loop lag. With ``metrics_port`` the worker serves ``/metrics`` (the first worker
process to bind the port; set ``PROMETHEUS_MULTIPROC_DIR`` with ``--workers`` > 1).

Moving a ``BackgroundTasks`` task to the queue keeps the call::

    background_tasks.add_task(queued(build_report), user_id, period="week")
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
from typing import TYPE_CHECKING, Any

from taskiq import TaskiqMessage, TaskiqMiddleware, TaskiqResult

from taskscope._queues import messages
from taskscope._record import Outcome, TaskRecord
from taskscope._runtime import Runtime, resolve, runtime_of
from taskscope._safe import qualified_type_name, safe_message

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from taskscope._config import Telemetry
    from taskscope.exposition import MetricsServer

__all__ = ("Queued", "TaskscopeMiddleware", "queued")

SYSTEM = "taskiq"


def _task_label(task_name: str) -> str:
    """taskiq's default ``module:function`` as taskscope's ``module.function``."""
    return task_name.replace(":", ".")


class _Running:
    __slots__ = (
        "coro", "error", "hung", "name", "retried", "span", "span_id", "start", "thread",
        "token", "trace_id", "wait",
    )  # fmt: skip

    def __init__(self, name: str, wait: float | None) -> None:
        self.name = name
        self.wait = wait
        self.start = 0.0
        self.span: Span | None = None
        self.token: object = None
        self.trace_id: str | None = None
        self.span_id: str | None = None
        self.error: BaseException | None = None
        self.retried = False
        # Read by the hung-task check (taskscope._hung): the coroutine of the worker's task
        # running this one (its await chain leads to the task's own code); hung: reports.
        self.coro: Any = None
        self.thread: int | None = None
        self.hung = 0


def _current_coroutine() -> Any:
    """The coroutine of the asyncio task calling ``pre_execute``: taskiq's receiver awaits
    the task's function in that same task, so the hung-task check can follow it there."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop
        return None
    return task.get_coro() if task is not None else None


class TaskscopeMiddleware(TaskiqMiddleware):
    """Observe every task sent through and run by the broker it is added to."""

    def __init__(
        self,
        telemetry: Telemetry | None = None,
        *,
        metrics_port: int | None = None,
        metrics_addr: str = "127.0.0.1",
    ) -> None:
        super().__init__()
        self._explicit = telemetry
        self._telemetry: Telemetry | None = None
        self.metrics_port = metrics_port
        self.metrics_addr = metrics_addr
        self.metrics_server: MetricsServer | None = None
        self._running: dict[str, _Running] = {}
        self._sync: dict[str, bool] = {}

    def _is_sync(self, task_name: str) -> bool:
        """A ``def`` task (run in the worker's thread pool), not an ``async def`` one."""
        found = self._sync.get(task_name)
        if found is None:
            task = self.broker.find_task(task_name) if self.broker is not None else None
            func = getattr(task, "original_func", None)
            found = func is not None and not inspect.iscoroutinefunction(func)
            if len(self._sync) < 4096:
                self._sync[task_name] = found
        return found

    @property
    def runtime(self) -> Runtime:
        if self._telemetry is None:
            self._telemetry = resolve(self._explicit)
        return runtime_of(self._telemetry)

    # -- lifecycle -------------------------------------------------------------------------
    async def startup(self) -> None:
        if not getattr(self.broker, "is_worker_process", False):
            return
        runtime = self.runtime
        if runtime.telemetry.loop_probe:
            from taskscope import start_loop_probe

            await start_loop_probe(runtime.telemetry)
        if self.metrics_port is not None and self.metrics_server is None:
            from taskscope.exposition import start_metrics_server

            multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
            # OSError: another worker process of this node serves the port already.
            with contextlib.suppress(OSError):
                self.metrics_server = start_metrics_server(
                    self.metrics_port,
                    self.metrics_addr,
                    None if multiprocess else runtime.telemetry.registry,
                )

    async def shutdown(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None

    # -- sending ---------------------------------------------------------------------------
    def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        """Stamp the labels; the PRODUCER span covers the message's creation.

        It ends here: taskiq calls no middleware when sending fails (``post_send`` is
        skipped), so a span left open until ``post_send`` would leak on every failure.
        """
        runtime = self.runtime
        name = runtime.names.admit(_task_label(message.task_name))
        running = self._running.get(message.task_id)
        if running is not None:  # the task is re-sent while it runs: a retry
            running.retried = True
        span = messages.start_producer_span(
            runtime, name, SYSTEM, {"messaging.message.id": message.task_id}
        )
        try:
            messages.stamp(message.labels, span)
        except Exception:
            runtime.absorb("tracing")
        if span is not None:
            messages.end_span(runtime, span, "success")
        return message

    # -- running ---------------------------------------------------------------------------
    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        runtime = self.runtime
        labels = message.labels
        wait = messages.queue_wait(labels.get(messages.PUBLISHED_AT), None, messages.wall_clock())
        run = _Running(runtime.names.admit(_task_label(message.task_name)), wait)
        parent = messages.extract_context(labels.get)
        run.span, run.token = messages.start_consumer_span(
            runtime,
            run.name,
            parent,
            wait=wait,
            system=SYSTEM,
            attributes={"messaging.message.id": message.task_id},
            sync=self._is_sync(message.task_name),
        )
        run.trace_id, run.span_id = messages.span_ids(run.span)
        run.start = runtime.telemetry.clock()
        run.coro = _current_coroutine()
        self._running[message.task_id] = run
        runtime.run_started(id(run), run.name, run.start, run)
        return message

    def on_error(
        self, message: TaskiqMessage, result: TaskiqResult[Any], exception: BaseException
    ) -> None:
        run = self._running.get(message.task_id)
        if run is not None:
            run.error = exception

    def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        run = self._running.pop(message.task_id, None)
        if run is None:
            return
        runtime = self.runtime
        end = runtime.telemetry.clock()
        runtime.run_ended(id(run), run.name)
        error = run.error
        outcome = _outcome(error, retried=run.retried)
        error_type = error_message = None
        if error is not None and outcome != "success":
            error_type = qualified_type_name(error)
            error_message = safe_message(error, runtime.telemetry)
        if run.span is not None:
            messages.end_span(
                runtime,
                run.span,
                outcome,
                error=error if outcome != "success" else None,
                message=error_message,
                token=run.token,
            )
        runtime.record(
            TaskRecord(
                run.name,
                outcome,
                self._is_sync(message.task_name),
                end - run.start,
                run.wait,
                error_type=error_type,
                error_message=error_message,
                trace_id=run.trace_id,
                span_id=run.span_id,
                hung_reported=run.hung > 0,
            )
        )


def _outcome(error: BaseException | None, *, retried: bool) -> Outcome:
    if error is None:
        return "success"
    from taskiq.exceptions import NoResultError

    if isinstance(error, NoResultError):
        return "success"  # the task asked for its result not to be stored
    if retried:
        return "retry"
    if isinstance(error, Exception):
        return "failure"
    if isinstance(error, asyncio.CancelledError | KeyboardInterrupt):
        return "cancelled"
    return "failure"


class Queued:
    """A callable for ``add_task`` that sends a taskiq task with the arguments given.

    Async, so ``BackgroundTasks`` awaits it on the loop after the response. Named
    ``publish:{task name}`` in taskscope's metrics, apart from the task the worker runs.
    """

    def __init__(self, task: Any, labels: dict[str, Any]) -> None:
        self.task = task
        self.labels = labels
        self.__taskscope_name__ = f"publish:{_task_label(task.task_name)}"

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kicker = self.task.kicker()
        if self.labels:
            kicker = kicker.with_labels(**self.labels)
        return await kicker.kiq(*args, **kwargs)

    def __repr__(self) -> str:
        return f"queued({self.task.task_name!r})"


def queued(task: Any, **labels: Any) -> Queued:
    """``add_task(queued(task), *args, **kwargs)``: send after the response is sent.

    ``labels`` are taskiq labels for this message (``retry_on_error``, ``timeout``, ...).
    """
    if not callable(getattr(task, "kicker", None)):
        msg = f"queued() needs a taskiq task (from @broker.task), not {task!r}"
        raise TypeError(msg)
    return Queued(task, labels)
