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


class LogRecorder:
    """A structlog-compatible logger that keeps every event (taskscope calls it directly)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def _log(self, level: str, event: str, **kw: Any) -> None:
        self.events.append({"event": event, "level": level, **kw})

    def info(self, event: str, **kw: Any) -> None:
        self._log("info", event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._log("warning", event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._log("error", event, **kw)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event]


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


def make_observed(**options: Any) -> Observed:
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
