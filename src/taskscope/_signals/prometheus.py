"""Prometheus metrics of background tasks, created once per registry."""

from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram

from taskscope._record import NOT_RUN_OUTCOMES, BlockRecord, TaskRecord
from taskscope._signals._families import FAMILIES, METRIC_NAMES, zero_series

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, Any] = weakref.WeakKeyDictionary()
_by_registry_lock = threading.Lock()

SIGNALS = ("prometheus", "otel_metrics", "tracing", "logging", "loop_probe", "sinks")
__all__ = ("METRIC_NAMES", "SIGNALS", "PrometheusMetrics", "metrics_for")


def metrics_for(registry: CollectorRegistry) -> Any:
    """The metrics on ``registry``, created on first use (no duplicate registrations).

    Single process: :class:`~taskscope._signals.prometheus_fast.FastMetrics` (values kept
    in plain Python, turned into families at scrape time). In prometheus_client's
    multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set when the first task runs), its
    metric objects, whose values live in the shared files.
    """
    with _by_registry_lock:
        metrics = _by_registry.get(registry)
        if metrics is None:
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                metrics = PrometheusMetrics(registry)
            else:
                from taskscope._signals.prometheus_fast import FastMetrics

                metrics = FastMetrics(registry)
            _by_registry[registry] = metrics
        return metrics


class PrometheusMetrics:
    """prometheus_client's metric objects (multiprocess mode); see the README's table."""

    tasks: Counter
    failures: Counter
    duration: Histogram
    wait: Histogram
    thread_wait: Histogram
    in_progress: Gauge
    oldest_running: Gauge
    loop_lag: Histogram
    loop_blocks: Counter
    loop_block_seconds: Histogram
    loop_busy: Counter
    warnings: Counter
    instrumentation_errors: Counter

    def __init__(self, registry: CollectorRegistry) -> None:
        for spec in FAMILIES:
            metric: Counter | Histogram | Gauge
            if spec.kind == "counter":
                metric = Counter(spec.name, spec.documentation, spec.labels, registry=registry)
            elif spec.kind == "histogram":
                metric = Histogram(
                    spec.name,
                    spec.documentation,
                    spec.labels,
                    buckets=spec.buckets,
                    registry=registry,
                )
            else:
                metric = Gauge(
                    spec.name,
                    spec.documentation,
                    spec.labels,
                    multiprocess_mode=spec.multiprocess_mode,
                    registry=registry,
                )
            setattr(self, spec.attribute, metric)
        for signal in SIGNALS:  # zero from the first scrape, so rate() works
            self.instrumentation_errors.labels(signal=signal)
        self._by_name: dict[str, _NameChildren] = {}
        self._by_outcome: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._sources: weakref.WeakSet[Any] = weakref.WeakSet()

    def watch(self, runtime: Any) -> None:
        """Read ``runtime``'s tasks in flight for the oldest-running gauge."""
        self._sources.add(runtime)

    def refresh_oldest(self) -> None:
        """Set the oldest-running gauge from the tasks in flight (the watchdog's scan:
        in multiprocess mode the values must be written by each process, not at scrape)."""
        ages: dict[str, float] = {}
        for runtime in list(self._sources):
            for name, age in runtime.oldest_running().items():
                ages[name] = max(age, ages.get(name, 0.0))
        for name in list(self._by_name):
            self.oldest_running.labels(task=name).set(ages.pop(name, 0.0))
        for name, age in ages.items():
            self.oldest_running.labels(task=name).set(age)

    # Labelled children are cached: ``labels()`` costs about 1 us (sorting, locking) and
    # runs several times per task. Both caches are bounded like the label values
    # (``max_task_names`` names x outcomes); a racing first use just calls ``labels()`` twice.
    def _of_name(self, name: str) -> _NameChildren:
        children = self._by_name.get(name)
        if children is None:
            # A new task name: the series the alert rules read start at zero (their value
            # lives in the multiprocess files from here on, so every worker exports it).
            for attribute, key in zero_series(name):
                getattr(self, attribute).labels(*key)
            children = self._by_name[name] = _NameChildren(self, name)
        return children

    def _of_outcome(self, name: str, outcome: str) -> tuple[Any, Any]:
        key = (name, outcome)
        children = self._by_outcome.get(key)
        if children is None:
            # The duration child is only created for outcomes that ran (no empty series
            # for skipped tasks, which histogram_quantile would turn into NaN).
            ran = outcome not in NOT_RUN_OUTCOMES
            children = self._by_outcome[key] = (
                self.tasks.labels(task=name, outcome=outcome),
                self.duration.labels(task=name, outcome=outcome) if ran else None,
            )
        return children

    def task_started(self, name: str) -> None:
        self._of_name(name).in_progress.inc()

    def task_finished(self, name: str) -> None:
        self._of_name(name).in_progress.dec()

    def record(self, record: TaskRecord) -> None:
        name = record.name
        if name not in self._by_name:
            self._of_name(name)
        total, duration = self._of_outcome(name, record.outcome)
        total.inc()
        if record.duration == 0.0 and record.outcome in NOT_RUN_OUTCOMES:
            return
        if duration is None:  # abandoned (or rejected, revoked) after running for a while
            duration = self.duration.labels(task=name, outcome=record.outcome)
        if record.trace_id:
            duration.observe(record.duration, {"trace_id": record.trace_id})
        else:
            duration.observe(record.duration)
        if record.wait is not None or record.thread_wait is not None or record.loop_busy > 0.0:
            children = self._of_name(name)
            if record.wait is not None:
                children.wait.observe(record.wait)
            if record.thread_wait is not None:
                children.thread_wait.observe(record.thread_wait)
            if record.loop_busy > 0.0:
                children.loop_busy.inc(record.loop_busy)
        if record.outcome == "failure":
            self.failures.labels(task=name, error_type=record.error_type or "Exception").inc()

    def block_detected(self, block: BlockRecord) -> None:
        self._of_name(block.task)
        self.loop_blocks.labels(task=block.task).inc()

    def block_ended(self, block: BlockRecord) -> None:
        exemplar = {"trace_id": block.trace_id} if block.trace_id else None
        self.loop_block_seconds.labels(task=block.task).observe(block.duration, exemplar)

    def lag(self, seconds: float) -> None:
        self.loop_lag.observe(seconds)

    def warning(self, name: str, kind: str) -> None:
        self._of_name(name)
        self.warnings.labels(task=name, kind=kind).inc()

    def instrumentation_error(self, signal: str) -> None:
        self.instrumentation_errors.labels(signal=signal).inc()


class _NameChildren:
    """The children of the families labelled by ``task`` alone.

    Each is created on first use, as ``labels()`` at that point did: no empty series
    (e.g. loop-busy seconds of a sync task) appear because of the cache.
    """

    __slots__ = ("_loop_busy", "_metrics", "_name", "_thread_wait", "_wait", "in_progress")

    def __init__(self, metrics: PrometheusMetrics, name: str) -> None:
        self._metrics = metrics
        self._name = name
        self.in_progress = metrics.in_progress.labels(task=name)
        metrics.oldest_running.labels(task=name)  # 0 until the watchdog sets it
        self._wait: Any = None
        self._thread_wait: Any = None
        self._loop_busy: Any = None

    @property
    def wait(self) -> Any:
        if self._wait is None:
            self._wait = self._metrics.wait.labels(task=self._name)
        return self._wait

    @property
    def thread_wait(self) -> Any:
        if self._thread_wait is None:
            self._thread_wait = self._metrics.thread_wait.labels(task=self._name)
        return self._thread_wait

    @property
    def loop_busy(self) -> Any:
        if self._loop_busy is None:
            self._loop_busy = self._metrics.loop_busy.labels(task=self._name)
        return self._loop_busy
