"""The OpenTelemetry copies of the metrics: names, units, attributes, buckets."""

from __future__ import annotations

from typing import Any

import pytest

from taskscope import BackgroundTasks
from taskscope._signals._buckets import TASK_SECONDS
from tests.conftest import Observed

pytestmark = pytest.mark.anyio


async def ok() -> None: ...


async def bad() -> None:
    raise OSError("disk")


def _metrics(observed: Observed) -> dict[str, Any]:
    data = observed.metric_reader.get_metrics_data()
    assert data is not None
    found: dict[str, Any] = {}
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                found[metric.name] = metric
    return found


async def test_otel_metrics_mirror_prometheus(observed: Observed) -> None:
    """taskscope.tasks / .task.duration / .task.failures carry task, outcome, error.type."""
    tasks = BackgroundTasks(telemetry=observed.telemetry)
    tasks.add_task(ok)
    tasks.add_task(bad)
    tasks.add_task(ok)
    with pytest.raises(OSError, match="disk"):
        await tasks()
    metrics = _metrics(observed)
    counts = {
        (p.attributes["task"], p.attributes["outcome"]): p.value
        for p in metrics["taskscope.tasks"].data.data_points
        if p.value  # the points created at 0 for the alert rules
    }
    assert counts == {
        ("tests.test_otel_metrics.ok", "success"): 1,
        ("tests.test_otel_metrics.bad", "failure"): 1,
        ("tests.test_otel_metrics.ok", "skipped"): 1,
    }
    duration = metrics["taskscope.task.duration"]
    assert duration.unit == "s"
    point = duration.data.data_points[0]
    assert tuple(point.explicit_bounds) == TASK_SECONDS
    (failure,) = metrics["taskscope.task.failures"].data.data_points
    assert failure.attributes["error.type"] == "OSError"  # the semantic-convention name
    assert "taskscope.tasks.in_progress" in metrics


def test_no_sdk_configured_skips_otel_metrics() -> None:
    """With only the API's default meter provider, the OTel copies are not computed."""
    from prometheus_client import CollectorRegistry

    from taskscope import Telemetry
    from taskscope._runtime import runtime_of

    runtime = runtime_of(Telemetry(registry=CollectorRegistry(), span_mode="off"))
    assert runtime.otel_metrics is None
    assert runtime.prometheus is not None
