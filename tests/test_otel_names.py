"""OTel metric names become, through the usual OTLP -> Prometheus translation, exactly the
names the dashboard and alert rules query: OTLP-only users see the same panels."""

from __future__ import annotations

import re

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry

from taskscope._signals.otel_metrics import OTEL_NAMES, OtelMetrics
from taskscope._signals.prometheus_fast import FastMetrics

# The unit suffixes of the OpenTelemetry -> Prometheus compatibility specification that
# taskscope's units use; annotations in braces ({task}) add no suffix.
UNIT_SUFFIXES = {"s": "seconds"}


def translate(name: str, unit: str, monotonic_sum: bool) -> str:
    """The Prometheus name an OTLP metric gets (collector's prometheus exporter and
    Prometheus's own OTLP receiver, with suffixes on: the defaults)."""
    translated = re.sub(r"[^a-zA-Z0-9_:]", "_", name)
    suffix = UNIT_SUFFIXES.get(unit, "")
    if suffix and not translated.endswith("_" + suffix):
        translated += "_" + suffix
    if monotonic_sum and not translated.endswith("_total"):
        translated += "_total"
    return translated


class _OneRunning:
    """What the oldest-running gauge reads from a runtime: one task running for 2 s."""

    def oldest_running(self) -> dict[str, float]:
        return {"app.send": 2.0}

    def absorb(self, signal: str) -> None:
        raise AssertionError(signal)


def test_every_otel_metric_translates_to_its_prometheus_name() -> None:
    """Each OTel instrument, as the SDK exports it, maps back to the Prometheus family."""
    reader = InMemoryMetricReader()
    metrics = OtelMetrics(MeterProvider(metric_readers=[reader]))
    metrics.task_started("app.send")
    running = _OneRunning()  # held: the sink keeps its sources weakly
    metrics.watch(running)
    metrics.instrumentation_error("tracing")
    metrics.warning("app.send", "too_many_tasks")
    from taskscope._record import BlockRecord, TaskRecord

    metrics.record(
        TaskRecord(
            "app.send",
            "failure",
            True,
            0.1,
            0.0,
            thread_wait=0.01,
            error_type="ValueError",
            loop_busy=0.1,
        )
    )
    block = BlockRecord("app.send", 0.2, "app.py:1", (), True, False, None, None)
    metrics.block_detected(block)
    metrics.block_ended(block)
    metrics.lag(0.001)
    data = reader.get_metrics_data()
    assert data is not None
    exported = {
        metric.name: metric
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }
    by_otel = {otel: prom for prom, otel in OTEL_NAMES.items()}
    assert set(exported) == set(by_otel)  # every family has its OTel copy, nothing extra
    for name, metric in exported.items():
        monotonic = bool(getattr(metric.data, "is_monotonic", False))
        assert translate(name, metric.unit or "", monotonic) == by_otel[name], name


def test_every_prometheus_family_has_an_otel_copy() -> None:
    """The catalogue of the Prometheus families and the OTel names agree both ways."""
    registry = CollectorRegistry()
    FastMetrics(registry)
    families = {
        metric.name + ("_total" if metric.type == "counter" else "")
        for metric in registry.collect()
    }
    assert families == set(OTEL_NAMES)


def test_otel_counters_of_a_new_task_name_start_at_zero() -> None:
    """OTLP-only users' alert series exist at 0 before the first skip, block or misuse, as
    the Prometheus ones do (a series born at 1 has no increase for the rules to see)."""
    from taskscope._record import TaskRecord

    reader = InMemoryMetricReader()
    metrics = OtelMetrics(MeterProvider(metric_readers=[reader]))
    metrics.task_started("app.send")
    metrics.record(TaskRecord("app.send", "success", False, 0.1, 0.0))
    data = reader.get_metrics_data()
    assert data is not None
    points = {
        (metric.name, tuple(sorted(dict(point.attributes or {}).items()))): getattr(
            point, "value", None
        )
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name
        in ("taskscope.tasks", "taskscope.task.loop_blocks", "taskscope.task.warnings")
        for point in metric.data.data_points
    }
    tasks = {key[1][0][1]: value for key, value in points.items() if key[0] == "taskscope.tasks"}
    assert tasks == {"success": 1, "failure": 0, "cancelled": 0, "skipped": 0, "abandoned": 0}
    assert points[("taskscope.task.loop_blocks", (("task", "app.send"),))] == 0
    warnings = [key for key in points if key[0] == "taskscope.task.warnings"]
    assert len(warnings) == 2
    assert all(points[key] == 0 for key in warnings)


def test_readme_metrics_table_is_the_catalogue() -> None:
    """The README's metrics table lists every metric of the catalogue, with its type,
    labels and OpenTelemetry name, and nothing else."""
    from pathlib import Path

    from taskscope._signals._families import FAMILIES

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`taskscope_"):
            rows[cells[0].strip("`")] = (cells[1], cells[2], cells[4].strip("`"))
    expected = {
        spec.exposed_name: (spec.kind, ", ".join(spec.labels), spec.otel_name) for spec in FAMILIES
    }
    assert rows == expected
