"""Celery: publish and worker hooks that turn each task run into one ``TaskRecord``.

Where each outcome comes from (see the README's outcome table):

- In the process that runs the task (the pool process, or the worker itself with
  ``--pool=solo``/``threads``): ``task_prerun`` starts the run, ``task_postrun``'s state
  decides the outcome (``SUCCESS``, ``FAILURE``, ``RETRY``, ``REJECTED``, ``IGNORED``);
  ``task_failure``/``task_retry`` only add the exception.
- In the worker's main process, for tasks whose pool process cannot report: a hard time
  limit (``task_failure`` with ``TimeLimitExceeded``, sent twice by Celery 5), a lost pool
  process (``WorkerLostError``), ``task_revoked`` (before the start, or with terminate) and
  ``task_unknown``. These are de-duplicated by task id; a pool process interrupted in the
  middle of a task (``task_postrun`` with no state) leaves the outcome to the main process.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from taskscope._queues import messages
from taskscope._queues.multiproc import clean_dead_processes
from taskscope._record import Outcome, TaskRecord
from taskscope._runtime import Runtime, resolve, runtime_of
from taskscope._safe import qualified_type_name, safe_message

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from taskscope._config import Telemetry
    from taskscope.exposition import MetricsServer

SYSTEM = "celery"
_STATES: dict[str | None, Outcome] = {
    "SUCCESS": "success",
    "FAILURE": "failure",
    "RETRY": "retry",
    "REJECTED": "rejected",
    "IGNORED": "skipped",
}
_FINALIZED_CAP = 10_000


class _Running:
    __slots__ = ("error", "name", "otel", "span", "span_id", "start", "token", "trace_id", "wait")

    def __init__(self, name: str, start: float, wait: float | None) -> None:
        self.name = name
        self.start = start
        self.wait = wait
        self.span: Span | None = None
        self.token: object = None
        self.trace_id: str | None = None
        self.span_id: str | None = None
        self.error: BaseException | None = None
        self.otel = False  # opentelemetry-instrumentation-celery makes the spans


class CeleryHooks:
    """The receivers connected for one Celery app (see :func:`taskscope.celery`)."""

    def __init__(
        self,
        app: Any,
        telemetry: Telemetry | None,
        metrics_port: int | None = None,
        metrics_addr: str = "127.0.0.1",
    ) -> None:
        self.app = app
        self._explicit = telemetry
        self._telemetry: Telemetry | None = None
        self._runtime: Runtime | None = None
        self.metrics_port = metrics_port
        self.metrics_addr = metrics_addr
        self.metrics_server: MetricsServer | None = None
        self.in_pool_process = False
        self._running: dict[str, _Running] = {}
        self._finalized: OrderedDict[str, None] = OrderedDict()
        # Main process: the worker's request objects by task id, while Celery holds them
        # (their start time and headers, for outcomes the pool process cannot report).
        self._received: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self._connected: list[tuple[Any, Callable[..., None]]] = []
        self._original_send: Any = None

    @property
    def runtime(self) -> Runtime:
        runtime = self._runtime
        if runtime is None:  # resolved at first use (never at instrument time), then kept
            self._telemetry = resolve(self._explicit)
            runtime = self._runtime = runtime_of(self._telemetry)
        return runtime

    # -- wiring ------------------------------------------------------------------------
    def connect(self) -> None:
        from celery import signals

        for signal, receiver in (
            (signals.task_received, self.on_received),
            (signals.task_prerun, self.on_prerun),
            (signals.task_postrun, self.on_postrun),
            (signals.task_failure, self.on_failure),
            (signals.task_retry, self.on_retry),
            (signals.task_revoked, self.on_revoked),
            (signals.task_unknown, self.on_unknown),
            (signals.worker_init, self.on_worker_init),
            (signals.worker_process_init, self.on_worker_process_init),
            (signals.worker_shutdown, self.on_worker_shutdown),
        ):
            signal.connect(receiver, weak=False)
            self._connected.append((signal, receiver))
        # The publish side: one wrapper on this app's task sender. The publish signals
        # cannot scope to an app, and after_task_publish is not sent when a publish
        # fails, which would leave a producer span open.
        amqp = self.app.amqp
        self._original_send = amqp.send_task_message
        amqp.send_task_message = self._sender(self._original_send)

    def disconnect(self) -> None:
        for signal, receiver in self._connected:
            signal.disconnect(receiver)
        self._connected.clear()
        if self._original_send is not None:
            self.app.amqp.send_task_message = self._original_send
            self._original_send = None
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None

    def _ours(self, task: Any) -> bool:
        return getattr(task, "app", None) is self.app

    # -- publish -------------------------------------------------------------------------
    def _sender(self, send: Callable[..., Any]) -> Callable[..., Any]:
        def send_task_message(producer: Any, name: str, message: Any, **options: Any) -> Any:
            runtime = self.runtime
            headers = getattr(message, "headers", None)
            span = None
            if isinstance(headers, dict):
                if not _otel_celery_active():
                    span = messages.start_producer_span(
                        runtime,
                        runtime.names.admit(name),
                        SYSTEM,
                        _destination(headers.get("id"), options.get("routing_key")),
                    )
                try:
                    messages.stamp(headers, span)
                except Exception:
                    runtime.absorb("tracing")
            try:
                result = send(producer, name, message, **options)
            except BaseException as exc:
                self._publish_failed(runtime, name, span, exc)
                raise
            if span is not None:
                messages.end_span(runtime, span, "success")
            return result

        send_task_message.__wrapped__ = send  # type: ignore[attr-defined]
        return send_task_message

    def _publish_failed(
        self, runtime: Runtime, name: str, span: Span | None, exc: BaseException
    ) -> None:
        trace_id = messages.span_ids(span)[0]
        if span is not None:
            text = safe_message(exc, runtime.telemetry)
            messages.end_span(runtime, span, "failure", error=exc, message=text)
        runtime.warning(
            runtime.names.admit(name),
            "publish_failed",
            error_type=qualified_type_name(exc),
            trace_id=trace_id,
        )

    # -- the process that runs the task ----------------------------------------------------
    def on_prerun(self, sender: Any = None, task_id: str = "", task: Any = None, **_: Any) -> None:
        if not self._ours(task):
            return
        runtime = self.runtime
        headers = _headers_of(task.request)  # the message's headers, as Celery received them
        run = _Running(
            runtime.names.admit(task.name),
            runtime.telemetry.clock(),
            messages.queue_wait(
                headers.get(messages.PUBLISHED_AT), headers.get("eta"), messages.wall_clock()
            ),
        )
        if _otel_celery_active():
            run.otel = True
            run.trace_id, run.span_id = messages.span_ids(_otel_span(task, task_id))
        elif runtime.tracer is None:  # no spans: the trace id alone, for logs and exemplars
            run.trace_id = messages.trace_id_of_header(headers.get("traceparent"))
        else:
            delivery = headers.get("delivery_info") or {}
            run.span, run.token = messages.start_consumer_span(
                runtime,
                run.name,
                messages.extract_context(headers.get),
                wait=run.wait,
                system=SYSTEM,
                attributes=_destination(task_id, delivery.get("routing_key")),
            )
            run.trace_id, run.span_id = messages.span_ids(run.span)
        self._running[task_id] = run
        runtime.run_started(id(run), run.name, run.start)

    def on_failure(
        self, sender: Any = None, task_id: str = "", exception: Any = None, **_: Any
    ) -> None:
        run = self._running.get(task_id)
        if run is not None:
            run.error = exception
        elif self._ours(sender):
            self._lost_or_timed_out(sender, task_id, exception)

    def on_retry(
        self, sender: Any = None, request: Any = None, reason: Any = None, **_: Any
    ) -> None:
        run = self._running.get(getattr(request, "id", None) or "")
        cause = getattr(reason, "exc", None) or reason  # Retry(exc=...): the cause
        if run is not None and isinstance(cause, BaseException):
            run.error = cause

    def on_postrun(
        self,
        sender: Any = None,
        task_id: str = "",
        task: Any = None,
        state: Any = None,
        retval: Any = None,
        **_: Any,
    ) -> None:
        run = self._running.pop(task_id, None)
        if run is None:
            return
        runtime = self.runtime
        end = runtime.telemetry.clock()
        runtime.run_ended(id(run), run.name)
        if run.otel and run.trace_id is None:
            run.trace_id, run.span_id = messages.span_ids(_otel_span(task, task_id))
        outcome = _STATES.get(state)
        if outcome is None:
            # Interrupted (SystemExit, KeyboardInterrupt): in a pool process, the main
            # process reports the task (lost, timed out, terminated); alone, it ends here.
            if run.span is not None:
                messages.end_span(
                    runtime, run.span, "cancelled", error=_Interrupted(), token=run.token
                )
            if self.in_pool_process:
                return
            outcome = "abandoned"
        error = run.error
        if error is None and isinstance(retval, BaseException):  # Reject, Ignore
            error = retval
        error_type = error_message = None
        if error is not None and outcome in ("failure", "retry", "rejected"):
            error_type = qualified_type_name(error)
            error_message = safe_message(error, runtime.telemetry)
        if run.span is not None and outcome != "abandoned":
            messages.end_span(
                runtime, run.span, outcome, error=error, message=error_message, token=run.token
            )
        runtime.record(
            TaskRecord(
                run.name,
                outcome,
                True,
                end - run.start,
                run.wait,
                error_type=error_type,
                error_message=error_message,
                trace_id=run.trace_id,
                span_id=run.span_id,
                reason=_REASONS.get(outcome),
            )
        )

    # -- the worker's main process -------------------------------------------------------
    def on_received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        task_id = getattr(request, "id", None)
        if task_id and self._ours(getattr(request, "task", None)):
            self._received[task_id] = request

    def _ran_for(self, task_id: str) -> float:
        """Seconds since the pool started ``task_id`` (0 if unknown or not started)."""
        started = getattr(self._received.get(task_id), "time_start", None)
        if not started:
            return 0.0
        return max(0.0, messages.wall_clock() - float(started))

    def _headers(self, task_id: str) -> Callable[[str], object]:
        headers = getattr(self._received.get(task_id), "request_dict", None) or {}
        return headers.get

    def _first_time(self, task_id: str) -> bool:
        """True once per task id (the main process may hear of one task twice)."""
        with self._lock:
            if task_id in self._finalized:
                return False
            self._finalized[task_id] = None
            if len(self._finalized) > _FINALIZED_CAP:
                self._finalized.popitem(last=False)
            return True

    def _lost_or_timed_out(self, task: Any, task_id: str, exception: Any) -> None:
        from billiard.exceptions import TimeLimitExceeded, WorkerLostError

        if not isinstance(exception, (TimeLimitExceeded, WorkerLostError)):
            return  # reported by the process that ran the task
        if not self._first_time(task_id):
            return
        runtime = self.runtime
        name = runtime.names.admit(task.name)
        context = messages.extract_context(self._headers(task_id))
        duration = self._ran_for(task_id)
        outcome: Outcome
        if isinstance(exception, TimeLimitExceeded):
            outcome = "failure"
            if not duration:
                with contextlib.suppress(TypeError, ValueError, IndexError):
                    duration = float(exception.args[0])  # killed at the limit
        elif _is_revoked(task_id):
            outcome = "cancelled"
        else:
            outcome = "abandoned"
        runtime.record(
            TaskRecord(
                name,
                outcome,
                True,
                duration,
                None,
                error_type=qualified_type_name(exception),
                error_message=safe_message(exception, runtime.telemetry),
                trace_id=messages.trace_id_of(context),
                reason="the pool process running it was lost" if outcome == "abandoned" else None,
            )
        )
        self._clean_dead_processes()

    def on_revoked(
        self,
        sender: Any = None,
        request: Any = None,
        terminated: bool = False,
        expired: bool = False,
        **_: Any,
    ) -> None:
        # ``request`` is the task's Context here (headers as attributes), not the Request.
        task_id = getattr(request, "id", None)
        if not task_id or not self._ours(sender):
            return
        if not self._first_time(task_id):
            return
        runtime = self.runtime
        name = runtime.names.admit(getattr(sender, "name", None) or "__unknown__")
        getter = _request_getter_of(request)
        trace_id = messages.trace_id_of(messages.extract_context(getter))
        if terminated:
            duration = self._ran_for(task_id)
            record = TaskRecord(name, "cancelled", True, duration, None, trace_id=trace_id)
        else:
            reason = "expired" if expired else "revoked before it started"
            record = TaskRecord(name, "revoked", True, 0.0, None, trace_id=trace_id, reason=reason)
        runtime.record(record)
        if terminated:
            self._clean_dead_processes()

    def on_unknown(self, sender: Any = None, name: str = "", id: str = "", **_: Any) -> None:
        if id and not self._first_time(id):
            return
        runtime = self.runtime
        runtime.record(
            TaskRecord(
                runtime.names.admit(name or "__unknown__"),
                "rejected",
                True,
                0.0,
                None,
                error_type="NotRegistered",
                reason="no task of this name is registered in the worker",
            )
        )

    def on_worker_init(self, sender: Any = None, **_: Any) -> None:
        pool = str(getattr(getattr(sender, "app", self.app), "conf", {}).get("worker_pool", ""))
        pool_cls = str(getattr(sender, "pool_cls", "") or pool)
        if "prefork" in pool_cls.lower() and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self.runtime.warning(
                "__worker__",
                "prefork_without_multiprocess",
                hint="set PROMETHEUS_MULTIPROC_DIR (one empty directory per worker node) "
                "before the worker starts, or the pool processes' metrics are not exported",
            )
        self._clean_dead_processes()
        if self.metrics_port is not None and self.metrics_server is None:
            from taskscope.exposition import start_metrics_server

            telemetry = self.runtime.telemetry
            registry = None if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else telemetry.registry
            self.metrics_server = start_metrics_server(
                self.metrics_port, self.metrics_addr, registry
            )

    def on_worker_process_init(self, **_: Any) -> None:
        self.in_pool_process = True
        self._running.clear()
        self._clean_dead_processes()  # the process this one replaces, if it was killed

    def on_worker_shutdown(self, **_: Any) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None

    def _clean_dead_processes(self) -> None:
        try:
            clean_dead_processes()
        except Exception:
            self.runtime.absorb("prometheus")


class _Interrupted(BaseException):
    """Stands for the interruption Celery does not pass to ``task_postrun``."""


_REASONS: dict[str, str] = {
    "skipped": "the task raised celery.exceptions.Ignore",
    "rejected": "the task raised celery.exceptions.Reject",
    "abandoned": "the worker was interrupted while the task ran",
}


def _destination(message_id: object, routing_key: object) -> dict[str, Any]:
    attributes: dict[str, Any] = {}
    if isinstance(message_id, str):
        attributes["messaging.message.id"] = message_id
    if isinstance(routing_key, str) and routing_key:
        attributes["messaging.destination.name"] = routing_key
    return attributes


def _headers_of(request: Any) -> dict[str, Any]:
    """A task's Context keeps the message headers as attributes (in its ``__dict__``)."""
    found = getattr(request, "__dict__", None)
    return found if isinstance(found, dict) else {}


def _request_getter_of(request: Any) -> Callable[[str], object]:
    return lambda key: getattr(request, key, None)


def _is_revoked(task_id: str) -> bool:
    try:
        from celery.worker import state

        return task_id in state.revoked
    except Exception:
        return False


def _otel_celery_active() -> bool:
    """opentelemetry-instrumentation-celery is on: its spans stand, taskscope adds none."""
    module = sys.modules.get("opentelemetry.instrumentation.celery")
    if module is None:
        return False
    instance = getattr(module.CeleryInstrumentor, "_instance", None)
    return bool(getattr(instance, "_is_instrumented_by_opentelemetry", False))


def _otel_span(task: Any, task_id: str) -> Span | None:
    try:
        from opentelemetry.instrumentation.celery import utils

        found = utils.retrieve_context(task, task_id)
    except Exception:
        return None
    return found[0] if found else None
