"""Fresh registry, providers and log capture for every test: no global state."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from taskscope import Telemetry
from taskscope.testing import ListLogger, reset

LogRecorder = ListLogger  # taskscope calls logger.info/warning/error(event, **fields)


@dataclass
class Observed:
    """One test's telemetry and everything it recorded."""

    telemetry: Telemetry
    registry: CollectorRegistry
    spans_exporter: InMemorySpanExporter
    metric_reader: InMemoryMetricReader
    logs: LogRecorder
    tracer_provider: TracerProvider

    def spans(self) -> list[ReadableSpan]:
        return list(self.spans_exporter.get_finished_spans())

    def task_spans(self) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.name.startswith("background_task ")]

    def value(self, name: str, **labels: str) -> float:
        found = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

    def outcomes(self) -> dict[tuple[str, str], float]:
        result: dict[tuple[str, str], float] = {}
        for metric in self.registry.collect():
            if metric.name == "taskscope_tasks":
                for sample in metric.samples:
                    if sample.name.endswith("_total") and sample.value:
                        key = (sample.labels["task"], sample.labels["outcome"])
                        result[key] = sample.value
        return result


# Set by the ``both_record_paths`` fixture: make_observed() then leaves OTel metrics off,
# so Prometheus is the only counting sink and successes take the batched hot path.
_batched_path = False


@pytest.fixture(params=["per-task", "batched"])
def both_record_paths(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test on both record paths: per task (the OTel meter provider is a second
    counting sink) and batched (Prometheus alone counts; no OTel metrics to read)."""
    global _batched_path  # read by make_observed, reset after the test
    _batched_path = request.param == "batched"
    try:
        yield request.param
    finally:
        _batched_path = False


def make_observed(**options: Any) -> Observed:
    if _batched_path:
        options.setdefault("otel_metrics", False)
    registry = CollectorRegistry()
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    logs = LogRecorder()
    options.setdefault("logger", logs)
    telemetry = Telemetry(
        registry=registry,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        **options,
    )
    return Observed(telemetry, registry, exporter, reader, logs, tracer_provider)


@pytest.fixture
def observed() -> Iterator[Observed]:
    obs = make_observed()
    yield obs
    obs.tracer_provider.shutdown()


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _no_instrumentation_left() -> Iterator[None]:
    """No process-wide state of taskscope leaks into the next test."""
    yield
    reset()  # taskscope.testing.reset(): patches, probes, the default Telemetry


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``redis-server`` on 127.0.0.1 for the session (the queue tests' broker)."""
    from tests.queue_services import running_redis

    with running_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url
