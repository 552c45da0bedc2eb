"""The batched hot path: plain async tasks, metrics only, successes queued and aggregated later.

It applies when the in-process Prometheus collector is the only sink that counts and no span
is made. What a scrape shows must be exactly what the per-task path records; failures,
hangs, cancellations and exits take the full record; nothing is lost or counted twice.
"""

from __future__ import annotations

import gc
import itertools
import threading
import time
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

from taskscope import BackgroundTasks, Sink, TaskRecord, Telemetry
from taskscope._runtime import DRAIN_EVERY, Runtime, runtime_of
from taskscope.testing import ListLogger

pytestmark = pytest.mark.anyio
P = "tests.test_batched_path."


async def ok(n: int = 0) -> None:
    await anyio.lowlevel.checkpoint()


async def fails() -> None:
    raise KeyError("gone")


def sync_ok() -> None: ...


class FakeClock:
    """Advances 1 ms per reading: both paths read it as often, so their values match."""

    def __init__(self) -> None:
        self._ticks = itertools.count()

    def __call__(self) -> float:
        return next(self._ticks) / 1000


def lean_telemetry(**options: Any) -> Telemetry:
    options.setdefault("registry", CollectorRegistry())
    options.setdefault("logger", ListLogger())
    options.setdefault("span_mode", "off")
    return Telemetry(otel_metrics=False, loop_probe=False, **options)


def traced(options: dict[str, Any]) -> InMemorySpanExporter | None:
    """Add an SDK tracer provider to ``options`` if they make spans; its exporter."""
    if options.get("span_mode", "off") == "off":
        return None
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    options["tracer_provider"] = provider
    return exporter


def span_shapes(exporter: InMemorySpanExporter | None) -> list[Any]:
    """What a span says, without its ids and times."""
    if exporter is None:
        return []
    return sorted(
        (
            span.name,
            sorted(
                (k, v) for k, v in (span.attributes or {}).items() if k != "taskscope.task.wait"
            ),
            span.status.status_code.name,
            [event.name for event in span.events],
            span.parent is not None,
        )
        for span in exporter.get_finished_spans()
    )


def batching(telemetry: Telemetry) -> bool:
    return runtime_of(telemetry).batching


def exposition(telemetry: Telemetry) -> str:
    """The scrape's lines, sorted (series appear in the order their names were first
    aggregated, which batching moves), without ``_created`` timestamps."""
    assert telemetry.registry is not None
    text = generate_latest(telemetry.registry).decode()
    return "\n".join(sorted(line for line in text.splitlines() if "_created" not in line))


async def workload(telemetry: Telemetry) -> None:
    """Successes, a failure, skipped tasks after it, a sync task, a nested collection."""
    for _ in range(3):
        tasks = BackgroundTasks(telemetry=telemetry)
        tasks.add_task(ok, 1)
        tasks.add_task(sync_ok)
        inner = BackgroundTasks(telemetry=telemetry)
        inner.add_task(ok, 2)
        tasks.tasks.append(inner)
        tasks.add_task(ok, 3)
        await tasks()
    failing = BackgroundTasks(telemetry=telemetry)
    failing.add_task(ok)
    failing.add_task(fails)
    failing.add_task(ok)
    with pytest.raises(KeyError):
        await failing()


async def test_it_applies_to_metrics_only_settings() -> None:
    assert batching(lean_telemetry())
    assert batching(lean_telemetry(span_mode="child"))  # the span is made on the way
    assert not batching(lean_telemetry(prometheus=False))
    assert batching(lean_telemetry(sinks=[object()]))  # a sink that wants no records

    class Records(Sink):
        def record(self, record: TaskRecord) -> None: ...

    assert not batching(lean_telemetry(sinks=[Records()]))  # the user's sink wants records


@pytest.mark.parametrize("span_mode", ["off", "child"])
async def test_the_scrape_is_the_per_task_paths_scrape(
    monkeypatch: pytest.MonkeyPatch, span_mode: str
) -> None:
    """Same metrics, logs and spans as the per-task path (a fake clock: same values)."""
    options: dict[str, Any] = {"clock": FakeClock(), "span_mode": span_mode}
    lean_spans = traced(options)
    lean = lean_telemetry(**options)
    await workload(lean)
    assert batching(lean)

    with monkeypatch.context() as patch:
        derive = Runtime._derive_sink_lists

        def without_batching(self: Runtime) -> None:
            derive(self)
            self.batching = False

        patch.setattr(Runtime, "_derive_sink_lists", without_batching)
        options = {"clock": FakeClock(), "span_mode": span_mode}
        per_task_spans = traced(options)
        per_task = lean_telemetry(**options)
        await workload(per_task)
        assert not batching(per_task)

    assert exposition(lean) == exposition(per_task)
    assert 'taskscope_tasks_total{outcome="success",task="tests.test_batched_path.ok"} 10.0' in (
        exposition(lean)
    )
    lean_logs = lean.logger.events
    per_task_logs = per_task.logger.events
    assert [e["event"] for e in lean_logs] == [e["event"] for e in per_task_logs]
    assert [e["event"] for e in lean_logs] == ["task.failed", "task.skipped"]
    assert span_shapes(lean_spans) == span_shapes(per_task_spans)
    assert len(span_shapes(lean_spans)) == (0 if span_mode == "off" else 14)  # not skipped


async def test_successes_wait_for_the_scrape_then_count_once() -> None:
    telemetry = lean_telemetry()
    registry = telemetry.registry
    assert registry is not None
    runtime = runtime_of(telemetry)
    tasks = BackgroundTasks(telemetry=telemetry)
    tasks.add_task(ok)
    await tasks()
    assert len(runtime.prometheus.pending) == 1  # queued, not aggregated on the loop
    labels = {"task": P + "ok", "outcome": "success"}
    assert registry.get_sample_value("taskscope_tasks_total", labels) == 1
    assert not runtime.prometheus.pending
    assert registry.get_sample_value("taskscope_tasks_total", labels) == 1  # not twice
    duration = {"task": P + "ok", "outcome": "success", "le": "+Inf"}
    assert registry.get_sample_value("taskscope_task_duration_seconds_bucket", duration) == 1
    assert registry.get_sample_value("taskscope_task_wait_seconds_count", {"task": P + "ok"}) == 1


async def test_the_loop_drains_every_so_many_successes() -> None:
    telemetry = lean_telemetry()
    runtime = runtime_of(telemetry)
    for _ in range(DRAIN_EVERY):
        tasks = BackgroundTasks(telemetry=telemetry)
        tasks.add_task(ok)
        await tasks()
    assert not runtime.prometheus.pending  # drained by the response that reached DRAIN_EVERY
    assert telemetry.registry is not None
    total = telemetry.registry.get_sample_value(
        "taskscope_tasks_total", {"task": P + "ok", "outcome": "success"}
    )
    assert total == DRAIN_EVERY


async def test_failures_and_cancellations_take_the_full_record() -> None:
    telemetry = lean_telemetry()
    registry = telemetry.registry
    assert registry is not None
    failing = BackgroundTasks(telemetry=telemetry)
    failing.add_task(fails)
    with pytest.raises(KeyError):
        await failing()
    assert registry.get_sample_value(
        "taskscope_task_failures_total", {"task": P + "fails", "error_type": "KeyError"}
    )
    failed = telemetry.logger.named("task.failed")
    assert failed[0]["error_type"] == "KeyError"

    started = anyio.Event()

    async def waits_forever() -> None:
        started.set()
        await anyio.sleep_forever()

    tasks = BackgroundTasks(telemetry=telemetry)
    tasks.add_task(waits_forever)
    tasks.add_task(ok)
    async with anyio.create_task_group() as group:
        group.start_soon(tasks)
        await started.wait()
        assert sum(runtime_of(telemetry).running()[1].values()) == 1  # in flight
        group.cancel_scope.cancel()
    outcomes = {
        (s.labels["task"].rsplit(".", 1)[-1], s.labels["outcome"]): s.value
        for m in registry.collect()
        if m.name == "taskscope_tasks"
        for s in m.samples
        if s.name.endswith("_total") and s.value
    }
    assert outcomes[("waits_forever", "cancelled")] == 1
    assert outcomes[("ok", "abandoned")] == 1
    assert not runtime_of(telemetry).inflight


async def test_exit_counts_what_ended_before_it_and_nothing_after() -> None:
    telemetry = lean_telemetry()
    runtime = runtime_of(telemetry)
    tasks = BackgroundTasks(telemetry=telemetry)
    tasks.add_task(ok)
    await tasks()
    assert runtime.prometheus.pending
    runtime.abandon_inflight()  # what the exit hook does
    later = BackgroundTasks(telemetry=telemetry)
    later.add_task(ok)
    await later()  # ends after exit was recorded: no second outcome
    assert telemetry.registry is not None
    assert (
        telemetry.registry.get_sample_value(
            "taskscope_tasks_total", {"task": P + "ok", "outcome": "success"}
        )
        == 1
    )


async def test_a_sink_added_later_gets_records_and_earlier_successes_stay_counted() -> None:
    telemetry = lean_telemetry()
    runtime = runtime_of(telemetry)
    tasks = BackgroundTasks(telemetry=telemetry)
    tasks.add_task(ok)
    await tasks()
    seen: list[Any] = []

    class Sink:
        def record(self, record: Any) -> None:
            seen.append(record)

    runtime.add_sink("sinks", Sink())
    assert not runtime.prometheus.pending
    assert not runtime.batching
    tasks = BackgroundTasks(telemetry=telemetry)
    tasks.add_task(ok)
    await tasks()
    assert [r.outcome for r in seen] == ["success"]
    assert telemetry.registry is not None
    assert (
        telemetry.registry.get_sample_value(
            "taskscope_tasks_total", {"task": P + "ok", "outcome": "success"}
        )
        == 2
    )


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_scrapes_from_another_thread_lose_nothing() -> None:
    """The loop appends while a scraping thread drains: every success counted once."""
    telemetry = lean_telemetry()
    registry = telemetry.registry
    assert registry is not None
    stop = threading.Event()
    scrapes = 0

    def scrape() -> None:
        nonlocal scrapes
        while not stop.is_set():
            generate_latest(registry)
            scrapes += 1

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        for _ in range(2000):
            tasks = BackgroundTasks(telemetry=telemetry)
            tasks.add_task(ok)
            tasks.add_task(ok)
            await tasks()
    finally:
        stop.set()
        scraper.join()
    assert scrapes > 0
    labels = {"task": P + "ok", "outcome": "success"}
    assert registry.get_sample_value("taskscope_tasks_total", labels) == 4000
    count = registry.get_sample_value("taskscope_task_duration_seconds_count", labels)
    assert count == 4000


async def test_traced_successes_carry_their_exemplar() -> None:
    """The trace id and the wall time of each success reach the duration bucket's
    exemplar, though the observation is aggregated later."""
    options: dict[str, Any] = {"span_mode": "child"}
    exporter = traced(options)
    assert exporter is not None
    telemetry = lean_telemetry(**options)
    before = time.time()
    tasks = BackgroundTasks(telemetry=telemetry)
    tasks.add_task(ok)
    await tasks()
    assert runtime_of(telemetry).prometheus.pending
    (span,) = exporter.get_finished_spans()
    assert span.context is not None
    trace_id = format(span.context.trace_id, "032x")
    assert telemetry.registry is not None
    text = openmetrics.generate_latest(telemetry.registry).decode()  # type: ignore[no-untyped-call]
    exemplars = [
        line for line in text.splitlines() if "duration_seconds_bucket" in line and "#" in line
    ]
    assert len(exemplars) == 1
    assert f'trace_id="{trace_id}"' in exemplars[0]
    seen_at = float(exemplars[0].rsplit(" ", 1)[-1])
    assert before <= seen_at <= time.time()


async def test_successes_outlive_the_settings_that_queued_them() -> None:
    """A Telemetry (and its runtime) collected before the scrape: its successes still
    count on the registry they were recorded for."""
    registry = CollectorRegistry()
    telemetry: Telemetry | None = lean_telemetry(registry=registry)
    assert telemetry is not None
    tasks = BackgroundTasks(telemetry=telemetry)
    tasks.add_task(ok)
    await tasks()
    del tasks, telemetry
    gc.collect()
    labels = {"task": P + "ok", "outcome": "success"}
    assert registry.get_sample_value("taskscope_tasks_total", labels) == 1
