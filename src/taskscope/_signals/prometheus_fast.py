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
import weakref
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from taskscope._record import NOT_RUN_OUTCOMES, BlockRecord, TaskRecord
from taskscope._signals._families import FAMILIES, zero_series

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

Key = tuple[str, ...]
_HOT_NAMES = 10_000  # task names whose series success() keeps at hand (names are bounded)


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
            self.exemplar(index, trace_id, value, time.time())

    def exemplar(self, index: int, trace_id: str, value: float, seen_at: float) -> None:
        """The latest exemplar of bucket ``index`` (``seen_at``: wall time, seconds)."""
        if self.exemplars is None:
            self.exemplars = [None] * len(self.counts)
        self.exemplars[index] = (trace_id, value, seen_at)


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

    def child(self, key: Key) -> _Histogram:
        """The series of ``key``, created empty at its first observation."""
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = _Histogram(len(self.bounds) + 1)
        return child

    def observe(self, key: Key, value: float, trace_id: str | None = None) -> None:
        self.child(key).observe(bisect_left(self.bounds, value), value, trace_id)

    def snapshot(self) -> list[tuple[Key, list[int], float, list[Any] | None]]:
        """The values, copied (call under the lock)."""
        return [
            (
                key,
                child.counts[:],
                child.sum,
                None if child.exemplars is None else child.exemplars[:],
            )
            for key, child in self.children.items()
        ]

    def family(self, snapshot: list[tuple[Key, list[int], float, list[Any] | None]]) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, counts, total, exemplars in snapshot:
            buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
            cumulative = 0
            for index, le in enumerate(self.les):
                cumulative += counts[index]
                exemplar = exemplars[index] if exemplars is not None else None
                if exemplar is None:
                    buckets.append((le, float(cumulative)))
                else:
                    trace_id, value, timestamp = exemplar
                    buckets.append(
                        (le, float(cumulative), Exemplar({"trace_id": trace_id}, value, timestamp))
                    )
            family.add_metric(list(key), buckets, total)
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

    def snapshot(self) -> list[tuple[Key, float]]:
        """The values, copied (call under the lock)."""
        return list(self.values.items())

    def family(self, snapshot: list[tuple[Key, float]]) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, value in snapshot:
            family.add_metric(list(key), value)
        return family


class _GaugeFamily(_CounterFamily):
    def family(self, snapshot: list[tuple[Key, float]]) -> Metric:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, value in snapshot:
            family.add_metric(list(key), value)
        return family


class FastMetrics:
    """Same interface as ``PrometheusMetrics``; registered as a single collector."""

    tasks: _CounterFamily
    failures: _CounterFamily
    duration: _HistogramFamily
    wait: _HistogramFamily
    thread_wait: _HistogramFamily
    in_progress: _GaugeFamily
    oldest_running: _GaugeFamily
    loop_lag: _HistogramFamily
    loop_blocks: _CounterFamily
    loop_block_seconds: _HistogramFamily
    loop_busy: _CounterFamily
    warnings: _CounterFamily
    instrumentation_errors: _CounterFamily

    def __init__(self, registry: CollectorRegistry) -> None:
        self._lock = threading.Lock()
        self._families: list[_CounterFamily | _HistogramFamily] = []
        for spec in FAMILIES:
            family: _CounterFamily | _HistogramFamily
            if spec.kind == "counter":
                family = _CounterFamily(spec.name, spec.documentation, spec.labels)
            elif spec.kind == "histogram":
                family = _HistogramFamily(spec.name, spec.documentation, spec.labels, spec.buckets)
            else:
                family = _GaugeFamily(spec.name, spec.documentation, spec.labels)
            setattr(self, spec.attribute, family)
            self._families.append(family)
        self.loop_lag.children[()] = _Histogram(len(self.loop_lag.bounds) + 1)  # from start
        from taskscope._signals.prometheus import SIGNALS

        for signal in SIGNALS:  # zero from the first scrape, so rate() works
            self.instrumentation_errors.values[(signal,)] = 0.0
        self._seen: set[str] = set()
        self._hot: dict[str, tuple[Key, _Histogram, _Histogram]] = {}  # see success()
        self._duration_bounds = self.duration.bounds
        self._wait_bounds = self.wait.bounds
        self._ran: set[Key] = set()  # names recorded: their in-progress series persist
        self._sources: weakref.WeakSet[Any] = weakref.WeakSet()
        # Successes queued by the runtimes' batched hot path, aggregated by drain() (at
        # every scrape). Here, not in a runtime: it outlives any runtime that fed it.
        self.pending: deque[tuple[str, float, float, float, str | None, float]] = deque()
        registry.register(self)  # raises if the names are taken: the sink is then off

    # The in-progress gauge is read from the runtimes' tasks in flight at scrape time:
    # the runtime does not call task_started/task_finished (nothing per task).
    reads_inflight = True

    def watch(self, runtime: Any) -> None:
        """Read ``runtime``'s tasks in flight, at scrape time: the in-progress and
        oldest-running gauges."""
        self._sources.add(runtime)

    def _see(self, name: str) -> None:
        """Create the alerting series of a new task name at zero (call with the lock)."""
        self._seen.add(name)
        for attribute, key in zero_series(name):
            values = getattr(self, attribute).values
            values.setdefault(key, 0.0)

    # -- the collector ---------------------------------------------------------------------
    def describe(self) -> list[Metric]:
        """Names only (for the registry's duplicate check), without touching the values."""
        kinds = {
            _CounterFamily: CounterMetricFamily,
            _GaugeFamily: GaugeMetricFamily,
            _HistogramFamily: HistogramMetricFamily,
        }
        return [kinds[type(f)](f.name, f.documentation) for f in self._families]

    def collect(self) -> Iterator[Metric]:
        self.drain()  # the successes queued since the last scrape
        ages: dict[Key, float] = {}
        counts: dict[Key, float] = {}
        for runtime in list(self._sources):  # outside the lock: the tasks' clocks
            try:
                found, running = runtime.running()
            except Exception:  # a failing clock must not fail the scrape
                runtime.absorb("prometheus")
                continue
            for name, age in found.items():
                ages[(name,)] = max(age, ages.get((name,), 0.0))
            for name, count in running.items():
                counts[(name,)] = counts.get((name,), 0.0) + count
        with self._lock:
            for key in counts:
                if key[0] not in self._seen:
                    self._see(key[0])
            self._ran.update(counts)
            # Every name that ever ran: 0 when none runs now (an alert's series persists).
            self.in_progress.values = {key: counts.get(key, 0.0) for key in self._ran}
            self.oldest_running.values = {key: ages.get(key, 0.0) for key in self._ran}
        # One family at a time: its values are copied under the lock (a C-level copy of a
        # dict, ~0.1 ms per 1,000 series), its metric objects built outside it. Building
        # them all under the lock held every task's record() on the event loop for the
        # whole collection (tens of ms at 10k series). Each family is consistent in itself,
        # as with prometheus_client's own metrics (one lock per metric).
        for family in self._families:
            with self._lock:
                snapshot: Any = family.snapshot()
            yield family.family(snapshot)

    # -- the signal interface ------------------------------------------------------------
    def success(
        self, name: str, duration: float, wait: float | None, trace_id: str | None, busy: float
    ) -> None:
        """The common record (an in-process task that succeeded), without a TaskRecord:
        one lock, then :meth:`_add_success`."""
        seen_at = time.time() if trace_id is not None else 0.0
        with self._lock:
            self._add_success(name, duration, wait, busy, trace_id, seen_at)

    def drain(self) -> None:
        """Aggregate the successes queued in :attr:`pending` by the batched hot path
        (``(name, duration, wait, busy, trace_id, seen_at)``, ``seen_at`` the wall time
        of the exemplar), taken out one by one under one lock: the loop thread may append
        while a scrape drains, and nothing is counted twice or lost."""
        pending = self.pending
        if not pending:
            return
        take = pending.popleft
        add = self._add_success
        with self._lock:
            while pending:
                try:
                    success = take()
                except IndexError:  # drained meanwhile by another thread
                    break
                add(*success)

    def _add_success(  # noqa: PLR0917 - one queued success, as queued
        self,
        name: str,
        duration: float,
        wait: float | None,
        busy: float,
        trace_id: str | None,
        seen_at: float,
    ) -> None:
        """Count one success (call with the lock): the series of ``name`` looked up once
        (``_hot``), one counter and two bucket increments, the exemplar if traced."""
        hot = self._hot.get(name)
        if hot is None:
            hot = self._hot_series(name)
        key, duration_child, wait_child = hot
        self.tasks.values[key] += 1.0  # created at 0 with the name (zero_series)
        index = bisect_left(self._duration_bounds, duration)
        duration_child.counts[index] += 1
        duration_child.sum += duration
        if trace_id is not None:
            duration_child.exemplar(index, trace_id, duration, seen_at)
        if wait is not None:
            wait_child.counts[bisect_left(self._wait_bounds, wait)] += 1
            wait_child.sum += wait
        if busy > 0.0:
            self.loop_busy.inc((name,), busy)

    def _hot_series(self, name: str) -> tuple[Key, _Histogram, _Histogram]:
        """The series a success of ``name`` updates (call with the lock; the histograms are
        created here, right before their first observation: never empty)."""
        if name not in self._seen:
            self._see(name)
        self._ran.add((name,))
        key = (name, "success")
        self.tasks.values.setdefault(key, 0.0)
        hot = (key, self.duration.child(key), self.wait.child((name,)))
        if len(self._hot) < _HOT_NAMES:
            self._hot[name] = hot
        return hot

    def record(self, record: TaskRecord) -> None:
        name = record.name
        by_outcome = (name, record.outcome)
        by_name = (name,)
        with self._lock:
            if name not in self._seen:
                self._see(name)
            self.tasks.inc(by_outcome)
            if by_name not in self._ran:
                self._ran.add(by_name)
            if record.duration == 0.0 and record.outcome in NOT_RUN_OUTCOMES:
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
            if block.task not in self._seen:
                self._see(block.task)
            self.loop_blocks.inc((block.task,))

    def block_ended(self, block: BlockRecord) -> None:
        with self._lock:
            self.loop_block_seconds.observe((block.task,), block.duration, block.trace_id)

    def lag(self, seconds: float) -> None:
        with self._lock:
            self.loop_lag.observe((), seconds)

    def warning(self, name: str, kind: str) -> None:
        with self._lock:
            if name not in self._seen:
                self._see(name)
            self.warnings.inc((name, kind))

    def instrumentation_error(self, signal: str) -> None:
        with self._lock:
            self.instrumentation_errors.inc((signal,))
