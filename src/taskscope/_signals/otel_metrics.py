"""The same facts as the Prometheus metrics, through the OpenTelemetry metrics API."""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import CallbackOptions, Observation

from taskscope._record import NOT_RUN_OUTCOMES, BlockRecord, TaskRecord
from taskscope._signals._buckets import BLOCK_SECONDS, LAG_SECONDS, TASK_SECONDS
from taskscope._signals._families import zero_series
from taskscope._version import __version__

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

# The attribute names of the zero series' label values (see _families.zero_series).
_ZERO_LABELS = {
    "tasks": ("task", "outcome"),
    "loop_blocks": ("task",),
    "warnings": ("task", "kind"),
}
# Prometheus name -> OpenTelemetry name (unit "s" for durations, "{task}" for counts).
OTEL_NAMES = {
    "taskscope_tasks_total": "taskscope.tasks",
    "taskscope_task_failures_total": "taskscope.task.failures",
    "taskscope_task_duration_seconds": "taskscope.task.duration",
    "taskscope_task_wait_seconds": "taskscope.task.wait",
    "taskscope_task_thread_wait_seconds": "taskscope.task.thread_wait",
    "taskscope_tasks_in_progress": "taskscope.tasks.in_progress",
    "taskscope_task_oldest_running_seconds": "taskscope.task.oldest_running",
    "taskscope_event_loop_lag_seconds": "taskscope.event_loop.lag",
    "taskscope_task_loop_blocks_total": "taskscope.task.loop_blocks",
    "taskscope_task_loop_block_seconds": "taskscope.task.loop_block",
    "taskscope_task_loop_busy_seconds_total": "taskscope.task.loop_busy",
    "taskscope_task_warnings_total": "taskscope.task.warnings",
    "taskscope_instrumentation_errors_total": "taskscope.instrumentation.errors",
}


class OtelMetrics:
    """Instruments on one meter; attribute keys match the Prometheus labels."""

    def __init__(self, provider: MeterProvider) -> None:
        meter = provider.get_meter("taskscope", __version__)
        n = OTEL_NAMES
        self.tasks = meter.create_counter(
            n["taskscope_tasks_total"], "{task}", "Background tasks by final outcome."
        )
        self.failures = meter.create_counter(
            n["taskscope_task_failures_total"], "{task}", "Background task failures."
        )
        self.duration = meter.create_histogram(
            n["taskscope_task_duration_seconds"],
            "s",
            "Run time of background tasks.",
            explicit_bucket_boundaries_advisory=list(TASK_SECONDS),
        )
        self.wait = meter.create_histogram(
            n["taskscope_task_wait_seconds"],
            "s",
            "Time from the response being sent to the task starting.",
            explicit_bucket_boundaries_advisory=list(TASK_SECONDS),
        )
        self.thread_wait = meter.create_histogram(
            n["taskscope_task_thread_wait_seconds"],
            "s",
            "Time sync tasks waited for a worker thread.",
            explicit_bucket_boundaries_advisory=list(TASK_SECONDS),
        )
        self.in_progress = meter.create_up_down_counter(
            n["taskscope_tasks_in_progress"], "{task}", "Background tasks running now."
        )
        self._sources: weakref.WeakSet[Any] = weakref.WeakSet()
        self._seen: set[str] = set()
        self._named: set[str] = set()  # task names whose zero points exist
        self.oldest_running = meter.create_observable_gauge(
            n["taskscope_task_oldest_running_seconds"],
            callbacks=[self._observe_oldest],
            unit="s",
            description="Age of the oldest running task of each name (0: none running).",
        )
        self.lag_histogram = meter.create_histogram(
            n["taskscope_event_loop_lag_seconds"],
            "s",
            "How late the event loop's heartbeat fired.",
            explicit_bucket_boundaries_advisory=list(LAG_SECONDS),
        )
        self.loop_blocks = meter.create_counter(
            n["taskscope_task_loop_blocks_total"], "{step}", "Event-loop stalls past the threshold."
        )
        self.loop_block_duration = meter.create_histogram(
            n["taskscope_task_loop_block_seconds"],
            "s",
            "Duration of event-loop stalls.",
            explicit_bucket_boundaries_advisory=list(BLOCK_SECONDS),
        )
        self.loop_busy = meter.create_counter(
            n["taskscope_task_loop_busy_seconds_total"],
            "s",
            "Seconds tasks held the loop (sampled).",
        )
        self.instrumentation_errors = meter.create_counter(
            n["taskscope_instrumentation_errors_total"],
            "{error}",
            "Errors inside taskscope's own instrumentation, absorbed (never raised).",
        )
        self.warnings = meter.create_counter(
            n["taskscope_task_warnings_total"], "{warning}", "Misuse flagged by taskscope."
        )

    def watch(self, runtime: Any) -> None:
        """Read ``runtime``'s tasks in flight, at collection, for the oldest-running gauge."""
        self._sources.add(runtime)

    def _observe_oldest(self, options: CallbackOptions) -> Iterable[Observation]:
        ages: dict[str, float] = {}
        for runtime in list(self._sources):
            try:
                found = runtime.oldest_running()
            except Exception:  # a failing clock must not fail the collection
                runtime.absorb("otel_metrics")
                continue
            for name, age in found.items():
                ages[name] = max(age, ages.get(name, 0.0))
        self._seen.update(ages)
        return [Observation(ages.get(name, 0.0), {"task": name}) for name in sorted(self._seen)]

    def _first_sight(self, name: str) -> None:
        """Create the counter points the alert rules read at 0 for a new task name (as the
        Prometheus sinks do), so an OTLP-only user's first skip or block is an increase."""
        self._named.add(name)
        counters = {"tasks": self.tasks, "loop_blocks": self.loop_blocks, "warnings": self.warnings}
        for attribute, key in zero_series(name):
            labels = _ZERO_LABELS[attribute]
            counters[attribute].add(0, dict(zip(labels, key, strict=True)))

    def task_started(self, name: str) -> None:
        if name not in self._named:
            self._first_sight(name)
        self.in_progress.add(1, {"task": name})

    def task_finished(self, name: str) -> None:
        self.in_progress.add(-1, {"task": name})

    def record(self, record: TaskRecord) -> None:
        name = record.name
        if name not in self._named:
            self._first_sight(name)
        self.tasks.add(1, {"task": name, "outcome": record.outcome})
        if record.outcome in NOT_RUN_OUTCOMES and record.duration == 0.0:
            return
        self.duration.record(record.duration, {"task": name, "outcome": record.outcome})
        if record.wait is not None:
            self.wait.record(record.wait, {"task": name})
        if record.thread_wait is not None:
            self.thread_wait.record(record.thread_wait, {"task": name})
        if record.outcome == "failure":
            self.failures.add(1, {"task": name, "error.type": record.error_type or "Exception"})
        if record.loop_busy > 0.0:
            self.loop_busy.add(record.loop_busy, {"task": name})

    def block_detected(self, block: BlockRecord) -> None:
        if block.task not in self._named:
            self._first_sight(block.task)
        self.loop_blocks.add(1, {"task": block.task})

    def block_ended(self, block: BlockRecord) -> None:
        self.loop_block_duration.record(block.duration, {"task": block.task})

    def lag(self, seconds: float) -> None:
        self.lag_histogram.record(seconds)

    def warning(self, name: str, kind: str) -> None:
        if name not in self._named:
            self._first_sight(name)
        self.warnings.add(1, {"task": name, "kind": kind})

    def instrumentation_error(self, signal: str) -> None:
        self.instrumentation_errors.add(1, {"signal": signal})
