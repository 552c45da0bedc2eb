"""The same facts as the Prometheus metrics, through the OpenTelemetry metrics API."""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import CallbackOptions, Observation

from taskscope._record import NOT_RUN_OUTCOMES, BlockRecord, TaskRecord
from taskscope._signals._families import FAMILIES, OTEL_NAMES, zero_series
from taskscope._version import __version__

if TYPE_CHECKING:
    from opentelemetry.metrics import (
        Counter,
        Histogram,
        MeterProvider,
        ObservableGauge,
        UpDownCounter,
    )

# The attribute names of the zero series' label values (see _families.zero_series).
_ZERO_LABELS = {
    "tasks": ("task", "outcome"),
    "loop_blocks": ("task",),
    "warnings": ("task", "kind"),
}


__all__ = ("OTEL_NAMES", "OtelMetrics")


class OtelMetrics:
    """Instruments on one meter; attribute keys match the Prometheus labels."""

    tasks: Counter
    failures: Counter
    duration: Histogram
    wait: Histogram
    thread_wait: Histogram
    in_progress: UpDownCounter
    oldest_running: ObservableGauge
    loop_lag: Histogram
    loop_blocks: Counter
    loop_block_seconds: Histogram
    loop_busy: Counter
    warnings: Counter
    instrumentation_errors: Counter

    def __init__(self, provider: MeterProvider) -> None:
        meter = provider.get_meter("taskscope", __version__)
        self._sources: weakref.WeakSet[Any] = weakref.WeakSet()
        self._seen: set[str] = set()
        self._named: set[str] = set()  # task names whose zero points exist
        for spec in FAMILIES:  # the catalogue: same facts, OTel names and units
            instrument: Any
            if spec.kind == "counter":
                instrument = meter.create_counter(
                    spec.otel_name, spec.otel_unit, spec.documentation
                )
            elif spec.kind == "histogram":
                instrument = meter.create_histogram(
                    spec.otel_name,
                    spec.otel_unit,
                    spec.documentation,
                    explicit_bucket_boundaries_advisory=list(spec.buckets),
                )
            elif spec.attribute == "oldest_running":  # read from the tasks in flight
                instrument = meter.create_observable_gauge(
                    spec.otel_name,
                    callbacks=[self._observe_oldest],
                    unit=spec.otel_unit,
                    description=spec.documentation,
                )
            else:  # in progress: moved by each task's start and end
                instrument = meter.create_up_down_counter(
                    spec.otel_name, spec.otel_unit, spec.documentation
                )
            setattr(self, spec.attribute, instrument)

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
        self.loop_block_seconds.record(block.duration, {"task": block.task})

    def lag(self, seconds: float) -> None:
        self.loop_lag.record(seconds)

    def warning(self, name: str, kind: str) -> None:
        if name not in self._named:
            self._first_sight(name)
        self.warnings.add(1, {"task": name, "kind": kind})

    def instrumentation_error(self, signal: str) -> None:
        self.instrumentation_errors.add(1, {"signal": signal})
