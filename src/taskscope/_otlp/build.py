"""Building the SDK providers and OTLP exporters (imported only once the SDK is known present)."""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter

from taskscope._otlp.counting import (
    CountingBatchSpanProcessor,
    CountingMetricExporter,
    CountingSpanExporter,
    OtlpCounters,
)
from taskscope._signals._families import FAMILIES

# The exporter's views: the catalogue's buckets for every histogram (the SDK's defaults
# would not match the dashboard's quantiles).
HISTOGRAM_BUCKETS: dict[str, tuple[float, ...]] = {
    spec.otel_name: spec.buckets for spec in FAMILIES if spec.kind == "histogram"
}
GRPC_MISSING = (
    "OTLP protocol 'grpc' needs the gRPC exporter: "
    "pip install opentelemetry-exporter-otlp-proto-grpc (or use protocol='http/protobuf')"
)


def make_resource(service_name: str | None, attributes: Mapping[str, str]) -> Resource:
    """The resource, from arguments only (``Resource.create`` would read ``os.environ``)."""
    try:
        sdk_version = version("opentelemetry-sdk")
    except PackageNotFoundError:  # pragma: no cover - vendored SDK
        sdk_version = "unknown"
    merged: dict[str, Any] = {
        "telemetry.sdk.language": "python",
        "telemetry.sdk.name": "opentelemetry",
        "telemetry.sdk.version": sdk_version,
        **attributes,
    }
    if service_name:
        merged["service.name"] = service_name
    merged.setdefault("service.name", "unknown_service")
    return Resource(merged)


def views() -> list[View]:
    """Explicit seconds buckets for taskscope's histograms (the SDK's default are ms-ish)."""
    return [
        View(
            instrument_name=name,
            meter_name="taskscope",
            aggregation=ExplicitBucketHistogramAggregation(boundaries=buckets),
        )
        for name, buckets in HISTOGRAM_BUCKETS.items()
    ]


def make_exporters(
    protocol: str,
    traces_endpoint: str,
    metrics_endpoint: str,
    headers: Mapping[str, str],
    timeout: float,
) -> tuple[SpanExporter, MetricExporter]:
    """The OTLP span and metric exporters for ``protocol``."""
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return (
            OTLPSpanExporter(endpoint=traces_endpoint, headers=dict(headers), timeout=timeout),
            OTLPMetricExporter(endpoint=metrics_endpoint, headers=dict(headers), timeout=timeout),
        )
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPMetricExporter as GrpcMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPSpanExporter as GrpcSpanExporter,
            )
        except ImportError as exc:
            raise ImportError(GRPC_MISSING) from exc
        grpc_headers = tuple(headers.items()) or None
        return (
            GrpcSpanExporter(endpoint=traces_endpoint, headers=grpc_headers, timeout=timeout),
            GrpcMetricExporter(endpoint=metrics_endpoint, headers=grpc_headers, timeout=timeout),
        )
    msg = "unsupported OTLP protocol: use 'http/protobuf' or 'grpc'"  # value not quoted
    raise ValueError(msg)


def make_tracer_provider(
    resource: Resource,
    exporter: SpanExporter,
    counters: OtlpCounters,
    *,
    export_timeout: float,
    schedule_delay: float,
    max_queue_size: int,
) -> tuple[TracerProvider, CountingBatchSpanProcessor]:
    """A tracer provider with one batch processor (never the blocking simple one)."""
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    processor = CountingBatchSpanProcessor(
        CountingSpanExporter(exporter, counters),
        counters,
        max_queue_size=max_queue_size,
        max_export_batch_size=min(512, max_queue_size),
        schedule_delay_millis=schedule_delay * 1000.0,
        export_timeout_millis=export_timeout * 1000.0,
    )
    provider.add_span_processor(processor)
    return provider, processor


def make_meter_provider(
    resource: Resource,
    exporter: MetricExporter,
    counters: OtlpCounters,
    *,
    export_timeout: float,
    export_interval: float,
) -> MeterProvider:
    """A meter provider exporting periodically, with seconds buckets for our histograms."""
    reader = PeriodicExportingMetricReader(
        CountingMetricExporter(exporter, counters),
        export_interval_millis=export_interval * 1000.0,
        export_timeout_millis=export_timeout * 1000.0,
    )
    return MeterProvider(
        metric_readers=[reader], resource=resource, views=views(), shutdown_on_exit=False
    )
