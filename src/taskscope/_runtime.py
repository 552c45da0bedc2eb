"""Per-``Telemetry`` live state: the instruments, the name cap, the tasks in flight."""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import threading
import weakref
from collections import Counter
from collections.abc import Callable
from types import FunctionType
from typing import TYPE_CHECKING, Any

# Imported with taskscope, not at the first task: the first task runs on the event loop,
# where an import is blocking file I/O (structlog's, which pulls in rich when installed,
# takes ~50 ms; blocking-call detectors such as blockbuster flag any of them).
import structlog
from opentelemetry import metrics, trace
from prometheus_client import REGISTRY

from taskscope._config import Telemetry
from taskscope._naming import OTHER, ErrorTypeLimiter, NameLimiter
from taskscope._record import TaskRecord
from taskscope._safe import safe_text
from taskscope._signals import prometheus_fast  # noqa: F401 - loaded now, not on the loop
from taskscope._signals.logs import LogEvents
from taskscope._signals.otel_metrics import OtelMetrics
from taskscope._signals.prometheus import metrics_for
from taskscope._sink import AdaptedSink
from taskscope._version import __version__

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from taskscope._record import BlockRecord, HungRecord

_create_lock = threading.Lock()
_NAMES_CACHE_SIZE = 4096
DRAIN_EVERY = 256  # queued successes the loop aggregates itself (else: at the next scrape)
_default: Telemetry | None = None
# Set by instrument_app()'s middleware for the duration of each request.
current_telemetry: contextvars.ContextVar[Telemetry | None] = contextvars.ContextVar(
    "taskscope_telemetry", default=None
)


def default_telemetry() -> Telemetry:
    """The process default, created at first use (never at import)."""
    global _default  # noqa: PLW0603 - the lazily resolved process default
    if _default is None:
        with _create_lock:
            if _default is None:
                _default = Telemetry()
    return _default


def resolve(explicit: Telemetry | None) -> Telemetry:
    if explicit is not None:
        return explicit
    return current_telemetry.get() or default_telemetry()


def runtime_of(telemetry: Telemetry) -> Runtime:
    runtime: Runtime | None = telemetry._runtime
    if runtime is None:
        with _create_lock:
            runtime = telemetry._runtime
            if runtime is None:
                runtime = Runtime(telemetry)
                object.__setattr__(telemetry, "_runtime", runtime)
    return runtime


class Runtime:
    """Fans every record out to the enabled signals and absorbs their failures."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self.names = NameLimiter(
            telemetry.max_task_names,
            redact=telemetry.redact,
            on_overflow=lambda: self.label_overflow(OTHER, "task_name_overflow"),
        )
        self.error_types = ErrorTypeLimiter(
            telemetry.max_error_types_per_task,
            telemetry.max_error_types,
            on_overflow=lambda task: self.label_overflow(task, "error_type_overflow"),
        )
        self._overflow_logged: set[str] = set()
        # Admitted task name per function (identity): the name of a function's tasks is
        # computed and bounded once, not per task. Bounded; past the cap, per task.
        self._names_by_func: dict[Any, str] = {}
        self.tracing = telemetry.span_mode != "off"  # whether tasks may get a span
        self.absorbed_errors = 0
        self.prometheus: Any = None
        self.otel_metrics: Any = None
        self.logs: Any = None
        self._sinks: list[tuple[str, Any]] = []
        self._tracer: Tracer | None = None
        # id(task) -> (name, start, run): start is None until the task starts; run (a
        # TaskRun, or a queue worker's record of a run) is what the hung-task check reads.
        self.inflight: dict[int, tuple[str, float | None, Any]] = {}
        self.exited = False
        # The batched hot path (see ``batching``): async successes queued in the
        # Prometheus collector's ``pending`` deque (it outlives this runtime), aggregated
        # by :meth:`drain` at scrape, at exit, and by the loop every ``DRAIN_EVERY`` records.
        self.batching = False
        self._inflight_lock = threading.Lock()
        self.hung_lock = threading.Lock()
        self._setup_sinks()
        _exit_watch.add(self)
        for hook in tuple(runtime_created):  # taskscope.testing.capture() listens here
            hook(self)

    def _setup_sinks(self) -> None:
        t = self.telemetry
        if t.prometheus:
            try:
                self.prometheus = metrics_for(t.registry if t.registry is not None else REGISTRY)
                self._sinks.append(("prometheus", self.prometheus))
            except Exception:  # a broken registry must not cost tasks
                self.absorbed_errors += 1
        if t.otel_metrics:
            try:
                provider = t.meter_provider or metrics.get_meter_provider()
                if t.meter_provider is not None or not _unconfigured(provider):
                    self.otel_metrics = OtelMetrics(provider)
                    self._sinks.append(("otel_metrics", self.otel_metrics))
            except Exception:
                self.absorb("otel_metrics")
        logger = t.logger if t.logger is not None else structlog.get_logger("taskscope")
        self.logs = LogEvents(logger)
        self._sinks.append(("logging", self.logs))
        for sink in t.sinks:  # the user's: every method optional
            self._sinks.append(("sinks", AdaptedSink(sink)))
        for signal, sink in self._sinks:  # the oldest-running gauge reads our tasks in flight
            watch = getattr(sink, "watch", None)
            if watch is not None:
                try:
                    watch(self)
                except Exception:
                    self.absorb(signal)
        self._derive_sink_lists()

    def _derive_sink_lists(self) -> None:
        """The per-task hot path's views of ``_sinks`` (rebuilt whenever it changes)."""
        # The sinks that count (all but logging).
        self._metric_sinks = [(s, sink) for s, sink in self._sinks if s != "logging"]
        # Told of each task's start and end: the sinks that keep an in-progress gauge
        # themselves. The in-process Prometheus collector reads the tasks in flight when
        # scraped instead (``reads_inflight``): nothing per task.
        self._progress_sinks = [
            (s, sink)
            for s, sink in self._metric_sinks
            if not getattr(sink, "reads_inflight", False) and hasattr(sink, "task_started")
        ]
        # An async task's success: sinks with a ``success()`` shortcut take the values
        # directly; a TaskRecord is built only if another sink wants one.
        self._success_sinks = [(s, k) for s, k in self._metric_sinks if hasattr(k, "success")]
        self._record_only_sinks = [
            (s, k)
            for s, k in self._metric_sinks
            if not hasattr(k, "success") and getattr(k, "wants_records", True)
        ]
        # The batched hot path applies when the in-process Prometheus collector is the only
        # sink that counts successes: a success is then one append.
        self.batching = (
            self.prometheus is not None
            and self._success_sinks == [("prometheus", self.prometheus)]
            and not self._record_only_sinks
            and not self._progress_sinks
            and hasattr(self.prometheus, "pending")
        )

    def add_sink(self, name: str, sink: Any) -> None:
        """Feed ``sink`` every record, block, hang, lag and warning from now on."""
        self.drain()  # what was queued before belongs to the sinks of before
        self._sinks = [*self._sinks, (name, sink)]  # copy on write: no torn loops
        self._derive_sink_lists()

    def remove_sink(self, sink: Any) -> None:
        self.drain()
        self._sinks = [(s, k) for s, k in self._sinks if k is not sink]
        self._derive_sink_lists()

    def task_name(self, func: Any, name_of: Callable[[Any], str]) -> str:
        """The bounded name of ``func``'s tasks (``name_of`` computes the raw name).

        Cached for plain functions without a closure (module-level functions: they live
        as long as the module anyway); lambdas, closures, partials and bound methods are
        made per call and would keep their captured objects alive in a cache.
        """
        if type(func) is not FunctionType or func.__closure__ is not None:
            return self.names.admit(name_of(func))
        name = self._names_by_func.get(func)
        if name is None:
            name = self.names.admit(name_of(func))
            if name != OTHER and len(self._names_by_func) < _NAMES_CACHE_SIZE:
                self._names_by_func[func] = name
        return name

    @property
    def tracer(self) -> Tracer | None:
        if self.telemetry.span_mode == "off":
            return None
        if self._tracer is None:
            provider = self.telemetry.tracer_provider or trace.get_tracer_provider()
            self._tracer = provider.get_tracer("taskscope", __version__)
        return self._tracer

    # -- fan-out ---------------------------------------------------------------------
    def absorb(self, signal: str) -> None:
        """Count an error inside taskscope's own instrumentation (never raised)."""
        self.absorbed_errors += 1
        for name, sink in (("prometheus", self.prometheus), ("otel_metrics", self.otel_metrics)):
            if sink is not None and signal != name:
                with contextlib.suppress(Exception):  # counted above; nothing more to do
                    sink.instrumentation_error(signal)

    def task_started(self, name: str) -> None:
        for signal, sink in self._progress_sinks:
            try:
                sink.task_started(name)
            except Exception:
                self.absorb(signal)

    def task_finished(self, name: str) -> None:
        for signal, sink in self._progress_sinks:
            try:
                sink.task_finished(name)
            except Exception:
                self.absorb(signal)

    def record(self, record: TaskRecord) -> None:
        if self.exited:  # already recorded as abandoned at exit: one outcome per task
            return
        if record.outcome == "success" and not record.hung_reported:
            # The common case: counted by the metric sinks, never logged (the logging sink
            # gets only the rare outcomes); no error type to bound.
            for signal, sink in self._metric_sinks:
                try:
                    sink.record(record)
                except Exception:
                    self.absorb(signal)
            return
        logged = record
        if record.error_type is not None:  # cleaned (and bounded) once, for every sink
            try:
                clean = safe_text(record.error_type, single_line=True, max_length=200)
                logged = record._replace(error_type=clean)  # logs are no labels: the class
                if record.outcome == "failure":  # the error_type label of the failures
                    error_type = self.error_types.admit(record.name, record.error_type)
                else:  # the interruption of a cancelled task: no label, not capped
                    error_type = clean
            except Exception:
                self.absorb("prometheus")
                error_type = OTHER
            record = record._replace(error_type=error_type)
        for signal, sink in self._sinks:
            try:
                sink.record(logged if signal == "logging" else record)
            except Exception:
                self.absorb(signal)

    def async_success(  # noqa: PLR0917 - the hot path: positional, no TaskRecord
        self,
        name: str,
        duration: float,
        wait: float,
        trace_id: str | None,
        span_id: str | None,
        busy: float,
        blocks: int,
    ) -> None:
        """Record an async task's success (the hot path): same signals as :meth:`record`
        with its TaskRecord, without building one unless a sink needs it."""
        if self.exited:
            return
        for signal, sink in self._success_sinks:
            try:
                sink.success(name, duration, wait, trace_id, busy)
            except Exception:
                self.absorb(signal)
        if self._record_only_sinks:
            record = TaskRecord(
                name, "success", False, duration, wait, None, None, None, trace_id, span_id,
                busy, blocks,
            )  # fmt: skip
            for signal, sink in self._record_only_sinks:
                try:
                    sink.record(record)
                except Exception:
                    self.absorb(signal)

    def drain(self) -> None:
        """Aggregate the successes queued by the batched hot path (any thread)."""
        drain = getattr(self.prometheus, "drain", None)
        if drain is None:  # no in-process collector: nothing is ever queued
            return
        try:
            drain()
        except Exception:
            self.absorb("prometheus")

    def block_detected(self, block: BlockRecord) -> None:
        for signal, sink in self._sinks:
            try:
                sink.block_detected(block)
            except Exception:
                self.absorb(signal)

    def block_ended(self, block: BlockRecord, *, reported: bool) -> None:
        for signal, sink in self._sinks:
            # Not reported by the watchdog: detected now (the log's one warning, the
            # counter); then ended (histogram; for the log, only after a watchdog report).
            try:
                if not reported:
                    sink.block_detected(block)
                if reported or signal != "logging":
                    sink.block_ended(block)
            except Exception:
                self.absorb(signal)

    def hung_detected(self, hung: HungRecord) -> None:
        for signal, sink in self._sinks:
            try:
                report = getattr(sink, "hung_detected", None)  # optional for user sinks
                if report is not None:
                    report(hung)
            except Exception:
                self.absorb(signal)

    def oldest_running(self) -> dict[str, float]:
        """Age (seconds) of the oldest running task per task name (scrape time, off the
        hot path: one copy of the in-flight entries)."""
        return self.running()[0]

    def running(self) -> tuple[dict[str, float], dict[str, int]]:
        """Per task name: the age (seconds) of the oldest running task, and how many run.

        Read at scrape time from the tasks in flight (one copy of the dict), so the hot
        path keeps no gauge of its own.
        """
        entries = self.inflight.copy()
        if not entries:
            return {}, {}
        now = self.telemetry.clock()
        ages: dict[str, float] = {}
        counts: dict[str, int] = {}
        for name, start, _ in entries.values():
            if start is not None:
                counts[name] = counts.get(name, 0) + 1
                age = max(0.0, now - start)
                if age > ages.get(name, -1.0):
                    ages[name] = age
        return ages, counts

    def refresh_oldest(self) -> None:
        """Multiprocess Prometheus: write the oldest-running gauge (the watchdog's scan)."""
        refresh = getattr(self.prometheus, "refresh_oldest", None)
        if refresh is not None:
            try:
                refresh()
            except Exception:
                self.absorb("prometheus")

    def lag(self, seconds: float) -> None:
        for signal, sink in self._metric_sinks:
            try:
                sink.lag(seconds)
            except Exception:
                self.absorb(signal)

    def warning(self, name: str, kind: str, **details: Any) -> None:
        for signal, sink in self._sinks:
            try:
                if signal == "logging":
                    sink.warning(name, kind, **details)
                else:
                    sink.warning(name, kind)
            except Exception:
                self.absorb(signal)

    def label_overflow(self, task: str, kind: str) -> None:
        """A label value became ``__other__``: counted in ``taskscope_task_warnings_total``
        (``kind`` = ``task_name_overflow`` or ``error_type_overflow``) every time, and
        logged once per kind (a log line per task would flood the log)."""
        for signal, sink in self._metric_sinks:
            try:
                sink.warning(task, kind)
            except Exception:
                self.absorb(signal)
        if kind not in self._overflow_logged:
            self._overflow_logged.add(kind)
            t = self.telemetry
            limits: dict[str, int] = (
                {"limit": t.max_task_names}
                if kind == "task_name_overflow"
                else {"limit": t.max_error_types, "limit_per_task": t.max_error_types_per_task}
            )
            try:
                self.logs.warning(task, kind, **limits)
            except Exception:
                self.absorb("logging")

    # -- accounting of tasks not yet ended ------------------------------------------------
    def track(self, key: int, name: str, start: float | None, run: Any = None) -> None:
        # Single dict operations are atomic under the GIL: no lock on the hot path.
        self.inflight[key] = (name, start, run)

    def untrack(self, key: int) -> None:
        self.inflight.pop(key, None)

    def run_started(self, key: int, name: str, start: float, run: Any = None) -> None:
        """A task starts running (in process or in a worker): in flight from ``start``, and
        the sinks that keep their own in-progress gauge told (none in the common case)."""
        self.inflight[key] = (name, start, run)
        if self._progress_sinks:
            self.task_started(name)

    def run_ended(self, key: int, name: str) -> None:
        """The task of :meth:`run_started` ended (its record follows)."""
        self.inflight.pop(key, None)
        if self._progress_sinks:
            self.task_finished(name)

    def abandon_inflight(self) -> dict[str, int]:
        """Record every task not ended yet as ``abandoned`` (called at interpreter exit)."""
        self.drain()  # the successes that ended before exit
        with self._inflight_lock:
            pending = list(self.inflight.values())
            self.inflight.clear()
            self.exited = True  # tasks that end from now on were counted here
        now = self.telemetry.clock()
        names: Counter[str] = Counter()
        for name, start, run in pending:
            names[name] += 1
            duration = max(0.0, now - start) if start is not None else 0.0
            hung = getattr(run, "hung", 0) > 0
            record = TaskRecord(name, "abandoned", False, duration, None, hung_reported=hung)
            for signal, sink in self._sinks:
                if signal == "logging":
                    continue  # one summary line below, not one line per task
                try:
                    sink.record(record)
                except Exception:
                    self.absorb(signal)
        if names:
            try:
                self.logs.abandoned_summary(dict(names))
            except Exception:
                self.absorb("logging")
        return dict(names)


def _unconfigured(provider: object) -> bool:
    """The API's default provider: no SDK was set up, the instruments would do nothing.

    Checked once, when the runtime is created (at the first task): configure the SDK's
    global meter provider at startup, or pass ``meter_provider`` explicitly.
    """
    cls = type(provider)
    return cls.__module__.startswith("opentelemetry.metrics") and cls.__name__ in (
        "_ProxyMeterProvider",
        "NoOpMeterProvider",
    )


class _ExitWatch:
    """One atexit hook for every runtime alive at exit (held weakly)."""

    def __init__(self) -> None:
        self._runtimes: weakref.WeakSet[Runtime] = weakref.WeakSet()
        self._registered = False
        self._lock = threading.Lock()

    def add(self, runtime: Runtime) -> None:
        with self._lock:
            self._runtimes.add(runtime)
            if not self._registered:
                atexit.register(self.run)
                self._registered = True

    def run(self) -> None:
        for runtime in list(self._runtimes):
            runtime.abandon_inflight()


_exit_watch = _ExitWatch()


def live_runtimes() -> list[Runtime]:
    """Every runtime alive now (one per Telemetry that has recorded something)."""
    return list(_exit_watch._runtimes)


# Called with every new Runtime (taskscope.testing captures from all of them).
runtime_created: list[Callable[[Runtime], None]] = []
