"""Telemetry(sinks=...): a user's sink gets the record stream; taskscope.testing.reset()."""

from __future__ import annotations

import threading

import anyio
import pytest
from starlette.background import BackgroundTask as StarletteBackgroundTask

import taskscope
from taskscope import BackgroundTasks, Sink, TaskRecord
from taskscope._instrumentor import is_instrumented
from taskscope._runtime import default_telemetry
from taskscope.testing import reset
from tests.conftest import make_observed
from tests.scenarios import quiet

pytestmark = pytest.mark.anyio


async def fails() -> None:
    msg = "boom"
    raise ValueError(msg)


class RecordsOnly(Sink):
    """A sink overriding one method."""

    def __init__(self) -> None:
        self.records: list[TaskRecord] = []

    def record(self, record: TaskRecord) -> None:
        self.records.append(record)


class Breaks:  # duck-typed: any object with some of the methods
    def record(self, record: TaskRecord) -> None:
        msg = "a sink's bug"
        raise RuntimeError(msg)


async def test_a_sink_gets_one_record_per_task(anyio_backend: str) -> None:
    """Every outcome reaches the sink, with the fields the other signals get."""
    sink = RecordsOnly()
    obs = make_observed(sinks=[sink])
    tasks = BackgroundTasks(telemetry=obs.telemetry)
    tasks.add_task(quiet.sleeps_async)
    tasks.add_task(fails)
    tasks.add_task(quiet.sync_sleeps)
    with pytest.raises(ValueError, match="boom"):
        await tasks()
    assert [(r.name, r.outcome) for r in sink.records] == [
        ("tests.scenarios.quiet.sleeps_async", "success"),
        ("tests.test_sinks.fails", "failure"),
        ("tests.scenarios.quiet.sync_sleeps", "skipped"),
    ]
    success, failure, _ = sink.records
    assert success.duration > 0.0
    assert success.wait is not None
    assert success.trace_id is not None  # the span's ids, as on the metrics' exemplars
    assert failure.error_type == "ValueError"
    assert failure.error_message == "boom"
    assert obs.outcomes() == {
        ("tests.scenarios.quiet.sleeps_async", "success"): 1.0,
        ("tests.test_sinks.fails", "failure"): 1.0,
        ("tests.scenarios.quiet.sync_sleeps", "skipped"): 1.0,
    }


async def test_a_failing_sink_costs_no_task_and_is_counted(anyio_backend: str) -> None:
    """What a sink raises is absorbed: the tasks run, Prometheus still counts, and the
    error is counted under signal="sinks"."""
    obs = make_observed(sinks=[Breaks()])
    tasks = BackgroundTasks(telemetry=obs.telemetry)
    tasks.add_task(quiet.sleeps_async)
    tasks.add_task(quiet.sleeps_async)
    await tasks()
    assert obs.outcomes() == {("tests.scenarios.quiet.sleeps_async", "success"): 2.0}
    assert obs.value("taskscope_instrumentation_errors_total", signal="sinks") == 2.0
    assert obs.value("taskscope_instrumentation_errors_total", signal="prometheus") == 0.0


def test_reset_undoes_process_wide_state() -> None:
    """instrument(), the default Telemetry and the loop probe's watchdog are gone after
    reset(); a later task starts from scratch."""
    original = StarletteBackgroundTask.__call__
    taskscope.instrument()
    assert StarletteBackgroundTask.__call__ is not original

    async def main() -> None:
        task = StarletteBackgroundTask(quiet.sleeps_async)
        await task()  # instrumented: the default Telemetry, its loop probe

    anyio.run(main)
    before = default_telemetry()
    reset()
    assert not is_instrumented()
    assert StarletteBackgroundTask.__call__ is original
    assert default_telemetry() is not before
    watchdogs = [t for t in threading.enumerate() if t.name == "taskscope-loop-watchdog"]
    assert all(not t.is_alive() for t in watchdogs)
