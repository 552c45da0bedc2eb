"""taskscope's metrics as one Prometheus collector, updated with plain dict arithmetic.

``prometheus_client``'s metric objects cost about 1 µs per observation (a lock and a few
Python calls per bucket value); taskscope records 4-6 observations per task. Here one lock
acquisition covers a whole task record and a histogram observation is a ``bisect`` and two
additions; the values become metric families only when scraped. Same names, labels,
buckets and exemplars as :class:`~taskscope._signals.prometheus.PrometheusMetrics`, which
stays in use in multiprocess mode (whose values must live in prometheus_client's files).
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from taskscope._record import BlockRecord, TaskRecord
from taskscope._signals._buckets import BLOCK_SECONDS, LAG_SECONDS, TASK_SECONDS

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

Key = tuple[str, ...]


class _Histogram:
    """Per-bucket counts (not cumulative), sum, and the latest exemplar per bucket."""

    __slots__ = ("counts", "exemplars", "sum")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.sum = 0.0
        self.exemplars: list[tuple[str, float, float] | None] | None = None

    def observe(self, index: int, value: float, trace_id: str | None) -> None:
        self.counts[index] += 1
        self.sum += value
        if trace_id is not None:
            if self.exemplars is None:
                self.exemplars = [None] * len(self.counts)
            self.exemplars[index] = (trace_id, value, time.time())


class _HistogramFamily:
    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], bounds: Sequence[float]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = list(labels)
        self.bounds = tuple(bounds)
        self.les = [_le(b) for b in self.bounds] + ["+Inf"]
        self.children: dict[Key, _Histogram] = {}

    def observe(self, key: Key, value: float, trace_id: str | None = None) -> None:
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = _Histogram(len(self.bounds) + 1)
        child.observe(bisect_left(self.bounds, value), value, trace_id)

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, child in list(self.children.items()):
            buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
            cumulative = 0
            exemplars = child.exemplars
            for index, le in enumerate(self.les):
                cumulative += child.counts[index]
                exemplar = exemplars[index] if exemplars is not None else None
                if exemplar is None:
                    buckets.append((le, float(cumulative)))
                else:
                    trace_id, value, timestamp = exemplar
                    buckets.append(
                        (le, float(cumulative), Exemplar({"trace_id": trace_id}, value, timestamp))
                    )
            family.add_metric(list(key), buckets, child.sum)
        return family


def _le(bound: float) -> str:
    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]


class _CounterFamily:
    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = list(labels)
        self.values: dict[Key, float] = {}

    def inc(self, key: Key, amount: float = 1.0) -> None:
        values = self.values
        values[key] = values.get(key, 0.0) + amount

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, value in list(self.values.items()):
            family.add_metric(list(key), value)
        return family


class FastMetrics:
    """Same interface as ``PrometheusMetrics``; registered as a single collector."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._lock = threading.Lock()
        self.tasks = _CounterFamily(
            "taskscope_tasks",
            "Background tasks by final outcome (every task added ends in exactly one).",
            ["task", "outcome"],
        )
        self.failures = _CounterFamily(
            "taskscope_task_failures",
            "Background task failures by exception class.",
            ["task", "error_type"],
        )
        self.duration = _HistogramFamily(
            "taskscope_task_duration_seconds",
            "Run time of background tasks.",
            ["task", "outcome"],
            TASK_SECONDS,
        )
        self.wait = _HistogramFamily(
            "taskscope_task_wait_seconds",
            "Time from the response being sent to the task starting (head-of-line wait).",
            ["task"],
            TASK_SECONDS,
        )
        self.thread_wait = _HistogramFamily(
            "taskscope_task_thread_wait_seconds",
            "Time sync tasks waited for a free worker thread (threadpool pressure).",
            ["task"],
            TASK_SECONDS,
        )
        self.in_progress: dict[Key, float] = {}
        self.loop_lag = _HistogramFamily(
            "taskscope_event_loop_lag_seconds",
            "How late the event loop's heartbeat fired.",
            [],
            LAG_SECONDS,
        )
        self.loop_lag.children[()] = _Histogram(len(LAG_SECONDS) + 1)  # present from start
        self.loop_blocks = _CounterFamily(
            "taskscope_task_loop_blocks",
            "Steps of async tasks that held the event loop longer than the threshold.",
            ["task"],
        )
        self.loop_block_seconds = _HistogramFamily(
            "taskscope_task_loop_block_seconds",
            "Duration of the steps that blocked the event loop.",
            ["task"],
            BLOCK_SECONDS,
        )
        self.loop_busy = _CounterFamily(
            "taskscope_task_loop_busy_seconds",
            "Seconds async tasks held the event loop (sum of their steps).",
            ["task"],
        )
        self.warnings = _CounterFamily(
            "taskscope_task_warnings",
            "Misuse flagged by taskscope (e.g. a sync task returning a coroutine).",
            ["task", "kind"],
        )
        self.instrumentation_errors = _CounterFamily(
            "taskscope_instrumentation_errors",
            "Errors inside taskscope's own instrumentation, absorbed so tasks are not lost.",
            ["signal"],
        )
        from taskscope._signals.prometheus import SIGNALS

        for signal in SIGNALS:  # zero from the first scrape, so rate() works
            self.instrumentation_errors.values[(signal,)] = 0.0
        registry.register(self)  # raises if the names are taken: the sink is then off

    # -- the collector ---------------------------------------------------------------------
    def describe(self) -> list[Metric]:
        return (
            [
                CounterMetricFamily(f.name, f.documentation)
                for f in (
                    self.tasks,
                    self.failures,
                    self.loop_blocks,
                    self.loop_busy,
                    self.warnings,
                    self.instrumentation_errors,
                )
            ]
            + [
                HistogramMetricFamily(f.name, f.documentation)
                for f in (
                    self.duration,
                    self.wait,
                    self.thread_wait,
                    self.loop_lag,
                    self.loop_block_seconds,
                )
            ]
            + [GaugeMetricFamily("taskscope_tasks_in_progress", "Background tasks running now.")]
        )

    def collect(self) -> Iterator[Metric]:
        with self._lock:  # a consistent snapshot; rendering happens outside the lock
            families = [
                self.tasks.family(),
                self.failures.family(),
                self.duration.family(),
                self.wait.family(),
                self.thread_wait.family(),
                self._in_progress_family(),
                self.loop_lag.family(),
                self.loop_blocks.family(),
                self.loop_block_seconds.family(),
                self.loop_busy.family(),
                self.warnings.family(),
                self.instrumentation_errors.family(),
            ]
        yield from families

    def _in_progress_family(self) -> Metric:
        family = GaugeMetricFamily(
            "taskscope_tasks_in_progress", "Background tasks running now.", labels=["task"]
        )
        for key, value in list(self.in_progress.items()):
            family.add_metric(list(key), value)
        return family

    # -- the signal interface ------------------------------------------------------------
    def task_started(self, name: str) -> None:
        key = (name,)
        with self._lock:
            self.in_progress[key] = self.in_progress.get(key, 0.0) + 1.0

    def task_finished(self, name: str) -> None:
        key = (name,)
        with self._lock:
            self.in_progress[key] = self.in_progress.get(key, 0.0) - 1.0

    def record(self, record: TaskRecord) -> None:
        name = record.name
        by_outcome = (name, record.outcome)
        by_name = (name,)
        with self._lock:
            self.tasks.inc(by_outcome)
            if record.duration == 0.0 and record.outcome in ("skipped", "abandoned"):
                return
            self.duration.observe(by_outcome, record.duration, record.trace_id)
            if record.wait is not None:
                self.wait.observe(by_name, record.wait)
            if record.thread_wait is not None:
                self.thread_wait.observe(by_name, record.thread_wait)
            if record.loop_busy > 0.0:
                self.loop_busy.inc(by_name, record.loop_busy)
            if record.outcome == "failure":
                self.failures.inc((name, record.error_type or "Exception"))

    def block_detected(self, block: BlockRecord) -> None:
        with self._lock:
            self.loop_blocks.inc((block.task,))

    def block_ended(self, block: BlockRecord) -> None:
        with self._lock:
            self.loop_block_seconds.observe((block.task,), block.duration, block.trace_id)

    def lag(self, seconds: float) -> None:
        with self._lock:
            self.loop_lag.observe((), seconds)

    def warning(self, name: str, kind: str) -> None:
        with self._lock:
            self.warnings.inc((name, kind))

    def instrumentation_error(self, signal: str) -> None:
        with self._lock:
            self.instrumentation_errors.inc((signal,))
