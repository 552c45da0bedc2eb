"""taskscope.otlp: spans and metrics reach a (test) collector; faults never reach the app."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any, Literal

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from taskscope import BackgroundTasks, Telemetry
from taskscope._signals._buckets import LAG_SECONDS, TASK_SECONDS
from taskscope.otlp import OtlpHandle, setup_otlp, setup_otlp_from_env
from tests.conftest import LogRecorder
from tests.otlp_receiver import Mode, OtlpReceiver, attributes

PREFIX = "tests.test_otlp."


async def ok_async() -> None:
    """An async task that succeeds."""


def ok_sync() -> None:
    """A sync task that succeeds."""


def failing() -> None:
    raise ValueError("card declined")


def make_app(telemetry: Telemetry, handle: OtlpHandle, *, fail: bool = True) -> Starlette:
    """GET / adds tasks inside a request-side span; GET /bare adds one with no span."""
    tracer = handle.tracer_provider.get_tracer("test.request")

    async def endpoint(request: Request) -> Response:
        tasks = BackgroundTasks(telemetry=telemetry)
        with tracer.start_as_current_span("GET /"):
            tasks.add_task(ok_async)
            tasks.add_task(ok_sync)
            if fail:
                tasks.add_task(failing)
        return Response("ok", background=tasks)

    async def bare(request: Request) -> Response:
        tasks = BackgroundTasks(telemetry=telemetry)
        tasks.add_task(ok_async)
        return Response("ok", background=tasks)

    return Starlette(routes=[Route("/", endpoint), Route("/bare", bare)])


def _closed_port_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


def test_spans_and_metrics_arrive(receiver: OtlpReceiver, registry: CollectorRegistry) -> None:
    """Task spans (shape, parent, failure) and seconds-bucketed metrics reach the collector."""
    handle = setup_otlp(
        endpoint=receiver.endpoint, service_name="shop", registry=registry, export_interval=60
    )
    telemetry = handle.telemetry(logger=LogRecorder())
    with TestClient(make_app(telemetry, handle), raise_server_exceptions=False) as client:
        assert client.get("/").status_code == 200
        assert client.get("/bare").status_code == 200
    assert handle.shutdown() is True

    spans = list(receiver.spans())
    assert {resource["service.name"] for resource, _ in spans} == {"shop"}
    (request,) = [s for _, s in spans if s.name == "GET /"]
    tasks = [s for _, s in spans if s.name.startswith("background_task ")]
    by_name = {s.name: s for s in tasks if s.parent_span_id}
    assert set(by_name) == {
        f"background_task {PREFIX}{n}" for n in ("ok_async", "ok_sync", "failing")
    }
    for name, span in by_name.items():
        attrs = attributes(span.attributes)
        assert span.kind == Span.SpanKind.SPAN_KIND_INTERNAL
        assert span.trace_id == request.trace_id
        assert span.parent_span_id == request.span_id
        assert attrs["code.function.name"] == name.removeprefix("background_task ")
        assert attrs["taskscope.task.sync"] is name.endswith(("ok_sync", "failing"))
    failed = by_name[f"background_task {PREFIX}failing"]
    assert attributes(failed.attributes)["error.type"] == "ValueError"
    assert failed.status.code == Status.StatusCode.STATUS_CODE_ERROR
    (event,) = [e for e in failed.events if e.name == "exception"]
    assert attributes(event.attributes)["exception.type"] == "ValueError"
    ok = by_name[f"background_task {PREFIX}ok_async"]
    assert ok.status.code != Status.StatusCode.STATUS_CODE_ERROR
    assert not any(e.name == "exception" for e in ok.events)
    # Without a request span the task span is a root.
    assert [s.parent_span_id for s in tasks if not s.parent_span_id] == [b""]

    counts = {
        (attributes(p.attributes)["task"], attributes(p.attributes)["outcome"]): p.as_int
        for _, p in receiver.metric_points("taskscope.tasks")
        if p.as_int  # the points created at 0 for the alert rules
    }
    assert counts == {
        (PREFIX + "ok_async", "success"): 2,
        (PREFIX + "ok_sync", "success"): 1,
        (PREFIX + "failing", "failure"): 1,
    }
    durations = receiver.metric_points("taskscope.task.duration")
    assert durations
    for metric, point in durations:
        assert metric.unit == "s"
        assert tuple(point.explicit_bounds) == TASK_SECONDS
        assert set(attributes(point.attributes)) == {"task", "outcome"}
    assert sum(p.count for _, p in durations) == 4
    for metric, point in receiver.metric_points("taskscope.event_loop.lag"):
        assert metric.unit == "s"
        assert tuple(point.explicit_bounds) == LAG_SECONDS
    failures = receiver.metric_points("taskscope.task.failures")
    assert [attributes(p.attributes)["error.type"] for _, p in failures] == ["ValueError"]
    assert (
        registry.get_sample_value("taskscope_otlp_export_failures_total", {"signal": "traces"}) == 0
    )
    assert registry.get_sample_value("taskscope_otlp_spans_dropped_total") == 0


@pytest.mark.parametrize("mode", ["refused", "unavailable", "hang"])
def test_collector_faults_never_reach_the_app(
    mode: Mode | Literal["refused"], registry: CollectorRegistry
) -> None:
    """Collector down, 503 or hung: requests stay fast, every task is recorded, shutdown is
    bounded and the failed exports are counted."""
    collector = None if mode == "refused" else OtlpReceiver(mode, hang_limit=15).start()
    try:
        endpoint = collector.endpoint if collector else _closed_port_endpoint()
        handle = setup_otlp(
            endpoint=endpoint,
            registry=registry,
            export_timeout=0.5,
            shutdown_timeout=2.0,
            export_interval=60,
            schedule_delay=0.05,
        )
        telemetry = handle.telemetry(logger=LogRecorder())
        app = make_app(telemetry, handle, fail=False)
        with TestClient(app) as client:
            for _ in range(5):
                started = time.perf_counter()
                assert client.get("/").status_code == 200
                assert time.perf_counter() - started < 0.5  # never waits for the exporter
        started = time.perf_counter()
        handle.shutdown()
        assert time.perf_counter() - started < handle.shutdown_timeout + 1.0
        for task in ("ok_async", "ok_sync"):
            found = registry.get_sample_value(
                "taskscope_tasks_total", {"task": PREFIX + task, "outcome": "success"}
            )
            assert found == 5
        for signal in ("traces", "metrics"):
            failures = registry.get_sample_value(
                "taskscope_otlp_export_failures_total", {"signal": signal}
            )
            assert failures is not None
            assert failures >= 1, signal
    finally:
        if collector is not None:
            collector.close()


def test_full_span_queue_drops_are_counted(registry: CollectorRegistry) -> None:
    """With the exporter stuck and the queue full, each further span is a counted drop."""
    with OtlpReceiver("hang", hang_limit=15) as collector:
        handle = setup_otlp(
            endpoint=collector.endpoint,
            registry=registry,
            max_queue_size=4,
            export_timeout=5.0,
            shutdown_timeout=1.0,
            export_interval=60,
        )
        assert handle.counts_dropped_spans
        tracer = handle.tracer_provider.get_tracer("test")
        for i in range(4):  # one full batch: the worker takes it and hangs exporting it
            tracer.start_span(f"first {i}").end()
        assert collector.wait_for(lambda: len(collector.traces) == 1)
        for i in range(4 + 3):  # four fill the queue again, three are dropped
            tracer.start_span(f"second {i}").end()
        assert registry.get_sample_value("taskscope_otlp_spans_dropped_total") == 3
        started = time.perf_counter()
        assert handle.shutdown() is False  # the hung export outlives the deadline
        assert time.perf_counter() - started < handle.shutdown_timeout + 1.0
        tracer.start_span("after shutdown").end()
        assert registry.get_sample_value("taskscope_otlp_spans_dropped_total") == 4


def test_from_env_reads_standard_variables(
    receiver: OtlpReceiver, registry: CollectorRegistry
) -> None:
    """OTEL_* endpoint, service name, resource attributes and headers are honoured."""
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{receiver.endpoint}/custom/traces",
        "OTEL_SERVICE_NAME": "billing",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test,team=a%2Cb,service.name=ignored",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=s3cret,x-tenant=acme%20corp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1500",
        "OTEL_METRIC_EXPORT_INTERVAL": "60000",
    }
    handle = OtlpHandle.from_env(environ, registry=registry, shutdown_timeout=2.5)
    assert handle.shutdown_timeout == 2.5
    handle.tracer_provider.get_tracer("test").start_span("hello").end()
    handle.meter_provider.get_meter("test").create_counter("hellos").add(1)
    assert handle.shutdown() is True
    (trace_request,) = receiver.traces
    assert trace_request.path == "/custom/traces"
    assert trace_request.headers["x-api-key"] == "s3cret"
    assert trace_request.headers["x-tenant"] == "acme corp"
    assert [r.path for r in receiver.metrics] == ["/v1/metrics"]
    (resource, span), *_ = receiver.spans()
    assert span.name == "hello"
    assert resource["service.name"] == "billing"
    assert resource["deployment.environment"] == "test"
    assert resource["team"] == "a,b"


def test_setup_reads_no_environment(
    monkeypatch: pytest.MonkeyPatch, receiver: OtlpReceiver, registry: CollectorRegistry
) -> None:
    """setup_otlp() takes its arguments only; from_env() with os.environ reads it at call time."""
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    explicit = setup_otlp(endpoint=receiver.endpoint, registry=registry)
    explicit.tracer_provider.get_tracer("t").start_span("explicit").end()
    explicit.shutdown()
    from_env = setup_otlp_from_env(registry=registry)
    from_env.tracer_provider.get_tracer("t").start_span("env").end()
    from_env.shutdown()
    names = {span.name: resource["service.name"] for resource, span in receiver.spans()}
    assert names == {"explicit": "unknown_service", "env": "from-env"}


def test_bad_configuration_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, registry: CollectorRegistry
) -> None:
    """Unknown protocol, unusable numbers and bad variables fail with a message that says why."""
    with pytest.raises(ValueError, match="unsupported OTLP protocol: use 'http/protobuf'") as info:
        setup_otlp(protocol="http/json", registry=registry)
    assert "http/json" not in str(info.value)  # a value is never quoted
    with pytest.raises(ValueError, match="shutdown_timeout"):
        setup_otlp(shutdown_timeout=0, registry=registry)
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_TIMEOUT"):
        OtlpHandle.from_env({"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"}, registry=registry)
    with pytest.raises(ValueError, match="OTEL_RESOURCE_ATTRIBUTES"):
        OtlpHandle.from_env({"OTEL_RESOURCE_ATTRIBUTES": "novalue"}, registry=registry)


def test_grpc_without_its_exporter_says_what_to_install(registry: CollectorRegistry) -> None:
    """protocol=grpc needs opentelemetry-exporter-otlp-proto-grpc; without it, say so."""
    pytest.importorskip("opentelemetry.sdk")
    if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is not None:
        pytest.skip("the gRPC exporter is installed")
    with pytest.raises(ImportError, match="pip install opentelemetry-exporter-otlp-proto-grpc"):
        OtlpHandle.from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, registry=registry)


def test_missing_sdk_says_install_the_extra(
    monkeypatch: pytest.MonkeyPatch, registry: CollectorRegistry
) -> None:
    """Without the SDK, setup_otlp raises ImportError naming the taskscope[otlp] extra."""
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(ImportError, match=r"pip install taskscope\[otlp\]"):
        setup_otlp(registry=registry)


def test_telemetry_uses_the_handles_providers(registry: CollectorRegistry) -> None:
    """handle.telemetry() wires both providers and the registry; overrides win."""
    handle = setup_otlp(endpoint=_closed_port_endpoint(), registry=registry)
    try:
        telemetry = handle.telemetry(span_mode="link")
        assert telemetry.tracer_provider is handle.tracer_provider
        assert telemetry.meter_provider is handle.meter_provider
        assert telemetry.registry is registry
        assert telemetry.span_mode == "link"
        other = CollectorRegistry()
        assert handle.telemetry(registry=other).registry is other
    finally:
        handle.shutdown(timeout=1.0)


def test_global_providers_untouched_unless_asked(registry: CollectorRegistry) -> None:
    """setup_otlp() does not replace the global tracer or meter provider by default."""
    from opentelemetry import metrics, trace

    before: tuple[Any, Any] = (trace.get_tracer_provider(), metrics.get_meter_provider())
    handle = setup_otlp(endpoint=_closed_port_endpoint(), registry=registry)
    try:
        assert (trace.get_tracer_provider(), metrics.get_meter_provider()) == before
    finally:
        handle.shutdown(timeout=1.0)


def test_counters_are_created_once_per_registry(registry: CollectorRegistry) -> None:
    """Two handles on one registry share the loss counters (no duplicate registration)."""
    first = setup_otlp(endpoint=_closed_port_endpoint(), registry=registry)
    second = setup_otlp(endpoint=_closed_port_endpoint(), registry=registry)
    try:
        value = registry.get_sample_value(
            "taskscope_otlp_export_failures_total", {"signal": "metrics"}
        )
        assert value == 0
    finally:
        first.shutdown(timeout=1.0)
        second.shutdown(timeout=1.0)


def test_force_flush_is_bounded(registry: CollectorRegistry) -> None:
    """force_flush() delivers what is buffered, and returns on time when the collector hangs."""
    with OtlpReceiver() as ok:
        handle = setup_otlp(endpoint=ok.endpoint, registry=registry, schedule_delay=60)
        handle.tracer_provider.get_tracer("t").start_span("buffered").end()
        assert handle.force_flush() is True
        assert [span.name for _, span in ok.spans()] == ["buffered"]
        handle.shutdown()
    with OtlpReceiver("hang", hang_limit=15) as hung:
        handle = setup_otlp(
            endpoint=hung.endpoint, registry=registry, schedule_delay=60, export_timeout=5.0
        )
        handle.tracer_provider.get_tracer("t").start_span("stuck").end()
        started = time.perf_counter()
        assert handle.force_flush(timeout=0.5) is False
        assert time.perf_counter() - started < 1.5
        handle.shutdown(timeout=0.5)


def test_spans_are_batched_never_exported_inline(registry: CollectorRegistry) -> None:
    """The tracer provider has exactly one processor, a BatchSpanProcessor."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    handle = setup_otlp(endpoint=_closed_port_endpoint(), registry=registry)
    try:
        processors = handle.tracer_provider._active_span_processor._span_processors
        assert len(processors) == 1
        assert isinstance(processors[0], BatchSpanProcessor)
    finally:
        handle.shutdown(timeout=1.0)


def test_exporter_exceptions_are_absorbed_and_counted(registry: CollectorRegistry) -> None:
    """An exporter that raises yields FAILURE (counted) instead of an exception."""
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from taskscope._otlp.counting import (
        CountingMetricExporter,
        CountingSpanExporter,
        counters_for,
    )

    class Raising(SpanExporter, MetricExporter):
        def export(self, *args: Any, **kwargs: Any) -> Any:
            raise ConnectionError("collector exploded")

        def force_flush(self, timeout_millis: float = 0) -> bool:
            return True

        def shutdown(self, *args: Any, **kwargs: Any) -> None:
            pass

    counters = counters_for(registry)
    spans = CountingSpanExporter(Raising(), counters)
    metrics = CountingMetricExporter(Raising(), counters)
    assert spans.export([]) is SpanExportResult.FAILURE
    assert metrics.export(None) is MetricExportResult.FAILURE  # type: ignore[arg-type]
    for signal in ("traces", "metrics"):
        value = registry.get_sample_value(
            "taskscope_otlp_export_failures_total", {"signal": signal}
        )
        assert value == 1


def test_bounded_runner_reports_errors_and_deadlines() -> None:
    """run_bounded() is False when a call raises or outlives the deadline, True otherwise."""
    import threading

    from taskscope._otlp.bounded import run_bounded

    def boom() -> None:
        raise RuntimeError("boom")

    release = threading.Event()
    try:
        assert run_bounded({"fine": lambda: None}, 1.0) is True
        assert run_bounded({"fine": lambda: None, "boom": boom}, 1.0) is False
        started = time.perf_counter()
        assert run_bounded({"stuck": lambda: release.wait(10)}, 0.2) is False
        assert time.perf_counter() - started < 1.0
    finally:
        release.set()


def test_set_global_installs_the_providers(receiver: OtlpReceiver) -> None:
    """set_global=True makes them the global providers (checked in a fresh interpreter)."""
    code = textwrap.dedent(
        f"""
        from opentelemetry import metrics, trace
        from prometheus_client import CollectorRegistry
        from taskscope.otlp import setup_otlp

        handle = setup_otlp(
            endpoint={receiver.endpoint!r}, registry=CollectorRegistry(), set_global=True
        )
        assert trace.get_tracer_provider() is handle.tracer_provider
        assert metrics.get_meter_provider() is handle.meter_provider
        trace.get_tracer("t").start_span("global").end()
        assert handle.shutdown()
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert [span.name for _, span in receiver.spans()] == ["global"]
