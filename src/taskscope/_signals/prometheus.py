"""Prometheus metrics of background tasks, created once per registry."""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from taskscope._record import BlockRecord, TaskRecord
from taskscope._signals._buckets import BLOCK_SECONDS, LAG_SECONDS, TASK_SECONDS

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, PrometheusMetrics] = (
    weakref.WeakKeyDictionary()
)
_by_registry_lock = threading.Lock()

SIGNALS = ("prometheus", "otel_metrics", "tracing", "logging", "loop_probe")
METRIC_NAMES = (
    "taskscope_tasks_total",
    "taskscope_task_failures_total",
    "taskscope_task_duration_seconds",
    "taskscope_task_wait_seconds",
    "taskscope_task_thread_wait_seconds",
    "taskscope_tasks_in_progress",
    "taskscope_event_loop_lag_seconds",
    "taskscope_task_loop_blocks_total",
    "taskscope_task_loop_block_seconds",
    "taskscope_task_loop_busy_seconds_total",
    "taskscope_task_warnings_total",
    "taskscope_instrumentation_errors_total",
)


def metrics_for(registry: CollectorRegistry) -> PrometheusMetrics:
    """The metrics on ``registry``, created on first use (no duplicate registrations)."""
    with _by_registry_lock:
        metrics = _by_registry.get(registry)
        if metrics is None:
            metrics = PrometheusMetrics(registry)
            _by_registry[registry] = metrics
        return metrics


class PrometheusMetrics:
    """The metric families; see the README's metrics table."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.tasks = Counter(
            "taskscope_tasks",
            "Background tasks by final outcome (every task added ends in exactly one).",
            ["task", "outcome"],
            registry=registry,
        )
        self.failures = Counter(
            "taskscope_task_failures",
            "Background task failures by exception class.",
            ["task", "error_type"],
            registry=registry,
        )
        self.duration = Histogram(
            "taskscope_task_duration_seconds",
            "Run time of background tasks.",
            ["task", "outcome"],
            buckets=TASK_SECONDS,
            registry=registry,
        )
        self.wait = Histogram(
            "taskscope_task_wait_seconds",
            "Time from the response being sent to the task starting (head-of-line wait).",
            ["task"],
            buckets=TASK_SECONDS,
            registry=registry,
        )
        self.thread_wait = Histogram(
            "taskscope_task_thread_wait_seconds",
            "Time sync tasks waited for a free worker thread (threadpool pressure).",
            ["task"],
            buckets=TASK_SECONDS,
            registry=registry,
        )
        self.in_progress = Gauge(
            "taskscope_tasks_in_progress",
            "Background tasks running now.",
            ["task"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.loop_lag = Histogram(
            "taskscope_event_loop_lag_seconds",
            "How late the event loop's heartbeat fired.",
            buckets=LAG_SECONDS,
            registry=registry,
        )
        self.loop_blocks = Counter(
            "taskscope_task_loop_blocks",
            "Steps of async tasks that held the event loop longer than the threshold.",
            ["task"],
            registry=registry,
        )
        self.loop_block_seconds = Histogram(
            "taskscope_task_loop_block_seconds",
            "Duration of the steps that blocked the event loop.",
            ["task"],
            buckets=BLOCK_SECONDS,
            registry=registry,
        )
        self.loop_busy = Counter(
            "taskscope_task_loop_busy_seconds",
            "Seconds async tasks held the event loop (sum of their steps).",
            ["task"],
            registry=registry,
        )
        self.warnings = Counter(
            "taskscope_task_warnings",
            "Misuse flagged by taskscope (e.g. a sync task returning a coroutine).",
            ["task", "kind"],
            registry=registry,
        )
        self.instrumentation_errors = Counter(
            "taskscope_instrumentation_errors",
            "Errors inside taskscope's own instrumentation, absorbed so tasks are not lost.",
            ["signal"],
            registry=registry,
        )
        for signal in SIGNALS:  # zero from the first scrape, so rate() works
            self.instrumentation_errors.labels(signal=signal)

    def task_started(self, name: str) -> None:
        self.in_progress.labels(task=name).inc()

    def task_finished(self, name: str) -> None:
        self.in_progress.labels(task=name).dec()

    def record(self, record: TaskRecord) -> None:
        name = record.name
        self.tasks.labels(task=name, outcome=record.outcome).inc()
        if record.outcome in ("skipped", "abandoned") and record.duration == 0.0:
            return
        exemplar = {"trace_id": record.trace_id} if record.trace_id else None
        self.duration.labels(task=name, outcome=record.outcome).observe(record.duration, exemplar)
        if record.wait is not None:
            self.wait.labels(task=name).observe(record.wait)
        if record.thread_wait is not None:
            self.thread_wait.labels(task=name).observe(record.thread_wait)
        if record.outcome == "failure":
            self.failures.labels(task=name, error_type=record.error_type or "Exception").inc()
        if record.loop_busy > 0.0:
            self.loop_busy.labels(task=name).inc(record.loop_busy)

    def block_detected(self, block: BlockRecord) -> None:
        self.loop_blocks.labels(task=block.task).inc()

    def block_ended(self, block: BlockRecord) -> None:
        exemplar = {"trace_id": block.trace_id} if block.trace_id else None
        self.loop_block_seconds.labels(task=block.task).observe(block.duration, exemplar)

    def lag(self, seconds: float) -> None:
        self.loop_lag.observe(seconds)

    def warning(self, name: str, kind: str) -> None:
        self.warnings.labels(task=name, kind=kind).inc()

    def instrumentation_error(self, signal: str) -> None:
        self.instrumentation_errors.labels(signal=signal).inc()
