"""Exporter and processor wrappers that count what OTLP export loses, in Prometheus.

The SDK only logs failed exports and queue-full drops; these wrappers turn them into
``taskscope_otlp_export_failures_total{signal}`` and ``taskscope_otlp_spans_dropped_total``
so that a dashboard and an alert can see telemetry going missing.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import Counter

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from prometheus_client import CollectorRegistry

_logger = logging.getLogger("taskscope.otlp")
SIGNALS = ("traces", "metrics")


class OtlpCounters:
    """The two counters on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.export_failures = Counter(
            "taskscope_otlp_export_failures",
            "OTLP export calls that failed (error status, timeout or exception).",
            ["signal"],
            registry=registry,
        )
        self.spans_dropped = Counter(
            "taskscope_otlp_spans_dropped",
            "Spans the batch processor dropped before export (queue full, or after shutdown).",
            registry=registry,
        )
        for signal in SIGNALS:  # present (zero) from the first scrape
            self.export_failures.labels(signal=signal)

    def failed(self, signal: str) -> None:
        try:
            self.export_failures.labels(signal=signal).inc()
        except Exception:  # counting must never break export
            _logger.debug("could not count an OTLP export failure", exc_info=True)

    def dropped(self, count: int) -> None:
        try:
            self.spans_dropped.inc(count)
        except Exception:
            _logger.debug("could not count dropped spans", exc_info=True)


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, OtlpCounters] = (
    weakref.WeakKeyDictionary()
)
_lock = threading.Lock()


def counters_for(registry: CollectorRegistry) -> OtlpCounters:
    """The counters on ``registry``, created once (no duplicate registrations)."""
    with _lock:
        counters = _by_registry.get(registry)
        if counters is None:
            counters = _by_registry[registry] = OtlpCounters(registry)
        return counters


class CountingSpanExporter(SpanExporter):
    """Delegates to a span exporter; counts failed results and absorbs exceptions."""

    def __init__(self, inner: SpanExporter, counters: OtlpCounters) -> None:
        self.inner = inner
        self._counters = counters

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:
            _logger.warning("OTLP span export raised", exc_info=True)
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self._counters.failed("traces")
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class CountingMetricExporter(MetricExporter):
    """Delegates to a metric exporter; counts failed results and absorbs exceptions."""

    def __init__(self, inner: MetricExporter, counters: OtlpCounters) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self.inner = inner
        self._counters = counters

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        try:
            result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception:
            _logger.warning("OTLP metric export raised", exc_info=True)
            result = MetricExportResult.FAILURE
        if result is not MetricExportResult.SUCCESS:
            self._counters.failed("metrics")
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


class _DropCounter:
    """Stands in for the batch processor's internal metrics object; counts drops."""

    def __init__(self, inner: Any, on_drop: Callable[[int], None]) -> None:
        self._inner = inner
        self._on_drop = on_drop

    def drop_items(self, count: int, *args: Any, **kwargs: Any) -> None:
        self._on_drop(count)
        self._inner.drop_items(count, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """A ``BatchSpanProcessor`` whose drops (queue full, ended after shutdown) are counted.

    The SDK reports a drop only to its own internal processor metrics (off by default)
    and a log line. This hooks that internal object (``_batch_processor._metrics``,
    checked on SDK 1.45): exact counts, no extra work per span. On an SDK without it,
    :attr:`counts_drops` is false and drops are not counted (only logged by the SDK).
    """

    def __init__(self, exporter: SpanExporter, counters: OtlpCounters, **options: Any) -> None:
        super().__init__(exporter, **options)
        processor = getattr(self, "_batch_processor", None)
        internal = getattr(processor, "_metrics", None)
        self.counts_drops = callable(getattr(internal, "drop_items", None))
        if self.counts_drops:
            processor._metrics = _DropCounter(internal, counters.dropped)  # type: ignore[union-attr]
