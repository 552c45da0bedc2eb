"""Every task added ends in exactly one recorded outcome; errors propagate unchanged."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest

from taskscope import BackgroundTask, BackgroundTasks, TelemetryMiddleware
from tests.conftest import Observed, make_observed

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("both_record_paths")]
P = "tests.test_outcomes."


async def ok() -> None: ...


def sync_ok() -> None: ...


async def fails() -> None:
    raise ValueError("bad value")


async def test_skipped_tasks_are_counted_and_logged(observed: Observed) -> None:
    """Tasks after a failing one are not run (Starlette) but counted and logged as skipped."""
    tasks = BackgroundTasks(telemetry=observed.telemetry)
    tasks.add_task(ok)
    tasks.add_task(fails)
    tasks.add_task(ok)
    tasks.add_task(sync_ok)
    with pytest.raises(ValueError, match="bad value"):
        await tasks()
    assert observed.outcomes() == {
        (P + "ok", "success"): 1,
        (P + "fails", "failure"): 1,
        (P + "ok", "skipped"): 1,
        (P + "sync_ok", "skipped"): 1,
    }
    assert (
        observed.value("taskscope_task_failures_total", task=P + "fails", error_type="ValueError")
        == 1
    )
    events = [(e["event"], e["task"]) for e in observed.logs.events]
    assert events == [
        ("task.failed", P + "fails"),
        ("task.skipped", P + "ok"),
        ("task.skipped", P + "sync_ok"),
    ]
    failed = observed.logs.named("task.failed")[0]
    assert failed["error_type"] == "ValueError"
    assert failed["error"] == "bad value"
    assert failed["trace_id"]
    assert failed["span_id"]


async def test_continue_on_error_runs_the_rest() -> None:
    """continue_on_error: every task runs; the first error still propagates at the end."""
    observed = make_observed(continue_on_error=True)
    ran: list[str] = []

    async def record() -> None:
        ran.append("after")

    tasks = BackgroundTasks(telemetry=observed.telemetry)
    tasks.add_task(fails)
    tasks.add_task(record)
    tasks.add_task(fails)
    with pytest.raises(ValueError, match="bad value"):
        await tasks()
    assert ran == ["after"]
    outcomes = observed.outcomes()
    assert outcomes[(P + "fails", "failure")] == 2
    assert sum(outcomes.values()) == 3


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit, GeneratorExit])
async def test_base_exceptions_are_recorded_and_propagated(exc_type: type[BaseException]) -> None:
    """BaseExceptions raised by a task: recorded, then propagated unchanged."""
    observed = make_observed()
    raised = exc_type("stop")

    async def interrupt() -> None:
        raise raised

    tasks = BackgroundTasks(telemetry=observed.telemetry)
    tasks.add_task(interrupt)
    tasks.add_task(ok)
    with pytest.raises(exc_type) as info:
        await tasks()
    assert info.value is raised
    outcomes = observed.outcomes()
    expected = "failure" if exc_type is SystemExit else "cancelled"
    name = "tests.test_outcomes.test_base_exceptions_are_recorded_and_propagated.<locals>.interrupt"
    assert outcomes[(name, expected)] == 1
    assert outcomes[(P + "ok", "abandoned")] == 1
    assert sum(outcomes.values()) == 2


async def test_cancellation_is_an_outcome(observed: Observed, anyio_backend: str) -> None:
    """A cancelled task is 'cancelled'; the tasks queued behind it are 'abandoned'."""
    started = anyio.Event()

    async def slow() -> None:
        started.set()
        await anyio.sleep(10)

    tasks = BackgroundTasks(telemetry=observed.telemetry)
    tasks.add_task(slow)
    tasks.add_task(ok)
    async with anyio.create_task_group() as group:
        group.start_soon(tasks)
        await started.wait()
        group.cancel_scope.cancel()
    outcomes = observed.outcomes()
    name = "tests.test_outcomes.test_cancellation_is_an_outcome.<locals>.slow"
    assert outcomes == {(name, "cancelled"): 1, (P + "ok", "abandoned"): 1}
    (span,) = observed.task_spans()
    assert dict(span.attributes or {})["taskscope.task.outcome"] == "cancelled"


async def test_in_progress_gauge_goes_up_and_down(observed: Observed) -> None:
    """taskscope_tasks_in_progress is 1 while a task runs and 0 after."""
    seen: list[float] = []

    async def look() -> None:
        seen.append(
            observed.value(
                "taskscope_tasks_in_progress",
                task=P.rstrip(".") + ".test_in_progress_gauge_goes_up_and_down.<locals>.look",
            )
        )

    tasks = BackgroundTasks(telemetry=observed.telemetry)
    tasks.add_task(look)
    await tasks()
    assert seen == [1.0]
    assert (
        observed.value(
            "taskscope_tasks_in_progress",
            task=P + "test_in_progress_gauge_goes_up_and_down.<locals>.look",
        )
        == 0.0
    )


async def test_wait_and_duration_use_the_injected_clock() -> None:
    """Wait (response sent -> start) and duration come from Telemetry.clock."""
    now = [100.0]

    def clock() -> float:
        return now[0]

    observed = make_observed(clock=clock, loop_probe=False)

    async def first() -> None:
        now[0] += 2.0

    async def second() -> None:
        now[0] += 0.5

    tasks = BackgroundTasks(telemetry=observed.telemetry)
    tasks.add_task(first)
    tasks.add_task(second)
    await tasks()
    prefix = "tests.test_outcomes.test_wait_and_duration_use_the_injected_clock.<locals>."
    assert (
        observed.value(
            "taskscope_task_duration_seconds_sum", task=prefix + "first", outcome="success"
        )
        == 2.0
    )
    assert (
        observed.value(
            "taskscope_task_duration_seconds_sum", task=prefix + "second", outcome="success"
        )
        == 0.5
    )
    assert observed.value("taskscope_task_wait_seconds_sum", task=prefix + "first") == 0.0
    assert observed.value("taskscope_task_wait_seconds_sum", task=prefix + "second") == 2.0


async def test_sync_duration_excludes_the_thread_wait() -> None:
    """Sync tasks: duration is the run in the worker thread; the wait for it is separate."""
    now = [10.0]
    observed = make_observed(clock=lambda: now[0], loop_probe=False)
    limiter = anyio.to_thread.current_default_thread_limiter()

    def work() -> None:
        now[0] += 0.25

    tasks = BackgroundTasks(telemetry=observed.telemetry)
    tasks.add_task(work)
    async with limiter:  # hold one token; advance the clock while the task waits
        original = limiter.total_tokens
        limiter.total_tokens = 1
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(tasks)
                await anyio.wait_all_tasks_blocked()
                now[0] += 1.0
                limiter.total_tokens = 2
        finally:
            limiter.total_tokens = original
    name = "tests.test_outcomes.test_sync_duration_excludes_the_thread_wait.<locals>.work"
    duration = observed.value("taskscope_task_duration_seconds_sum", task=name, outcome="success")
    assert duration == 0.25
    assert observed.value("taskscope_task_thread_wait_seconds_sum", task=name) == 1.0


async def test_thread_wait_recorded_for_sync_tasks(observed: Observed) -> None:
    """Sync tasks record the time they waited for a worker thread."""
    tasks = BackgroundTasks(telemetry=observed.telemetry)
    tasks.add_task(sync_ok)
    await tasks()
    assert observed.value("taskscope_task_thread_wait_seconds_count", task=P + "sync_ok") == 1


async def test_sync_task_returning_a_coroutine_is_flagged(observed: Observed) -> None:
    """A sync callable returning a coroutine: RuntimeWarning, counted, logged."""

    async def real() -> None: ...

    def wrong() -> Any:
        return real()

    tasks = BackgroundTasks(telemetry=observed.telemetry)
    tasks.add_task(wrong)
    with pytest.warns(RuntimeWarning, match="returned an awaitable"):
        await tasks()
    name = "tests.test_outcomes.test_sync_task_returning_a_coroutine_is_flagged.<locals>.wrong"
    assert (
        observed.value("taskscope_task_warnings_total", task=name, kind="coroutine_not_awaited")
        == 1
    )
    assert observed.logs.named("task.coroutine_not_awaited")


@pytest.mark.parametrize("bad", [None, 42, "print", object()])
def test_non_callable_fails_at_add_task(bad: object) -> None:
    """A non-callable is rejected at add_task with a clear TypeError."""
    with pytest.raises(TypeError, match="must be callable"):
        BackgroundTasks().add_task(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be callable"):
        BackgroundTask(bad)  # type: ignore[arg-type]


async def test_hostile_exception_str_is_recorded(observed: Observed) -> None:
    """An exception whose __str__ raises is still recorded, and propagated unchanged."""

    class Nasty(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str for you")

    error = Nasty()

    async def raise_nasty() -> None:
        raise error

    tasks = BackgroundTasks(telemetry=observed.telemetry)
    tasks.add_task(raise_nasty)
    with pytest.raises(Nasty) as info:
        await tasks()
    assert info.value is error
    (failed,) = observed.logs.named("task.failed")
    assert failed["error"] == "<unprintable Nasty>"


async def test_too_many_tasks_warns_once() -> None:
    """Past max_tasks_per_response add_task calls: one warning event, counted."""
    observed = make_observed(max_tasks_per_response=3)
    tasks = BackgroundTasks(telemetry=observed.telemetry)
    for _ in range(10):
        tasks.add_task(ok)
    assert len(observed.logs.named("task.too_many_tasks")) == 1
    await tasks()
    assert observed.value("taskscope_tasks_total", task=P + "ok", outcome="success") == 10


async def test_broken_signals_never_cost_a_task() -> None:
    """A logger, span exporter and metric reader that all raise: tasks still run and count."""
    from opentelemetry.sdk.trace.export import SpanExportResult

    class BrokenLogger:
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("logger down")

    observed = make_observed(logger=BrokenLogger())

    def broken_export(spans: Any) -> SpanExportResult:
        raise ConnectionError("collector down")

    observed.spans_exporter.export = broken_export  # type: ignore[method-assign]
    ran: list[int] = []

    async def job() -> None:
        ran.append(1)

    tasks = BackgroundTasks(telemetry=observed.telemetry)
    tasks.add_task(job)
    tasks.add_task(fails)
    with pytest.raises(ValueError, match="bad value"):
        await tasks()
    assert ran == [1]
    name = "tests.test_outcomes.test_broken_signals_never_cost_a_task.<locals>.job"
    assert observed.value("taskscope_tasks_total", task=name, outcome="success") == 1
    assert observed.value("taskscope_instrumentation_errors_total", signal="logging") >= 1


async def test_middleware_scopes_plain_background_task(observed: Observed) -> None:
    """TelemetryMiddleware: BackgroundTask() created in the request uses its telemetry."""
    from starlette.responses import Response

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await Response("ok", background=BackgroundTask(ok))(scope, receive, send)

    from starlette.testclient import TestClient

    with anyio.fail_after(10):
        await anyio.to_thread.run_sync(
            lambda: TestClient(TelemetryMiddleware(app, observed.telemetry)).get("/")
        )
    assert observed.outcomes() == {(P + "ok", "success"): 1}


async def test_asyncio_cancelled_error_from_task_is_cancelled() -> None:
    """A task raising CancelledError itself is recorded as cancelled (asyncio)."""
    observed = make_observed()

    async def cancel_me() -> None:
        raise asyncio.CancelledError

    tasks = BackgroundTasks(telemetry=observed.telemetry)
    tasks.add_task(cancel_me)
    with pytest.raises(asyncio.CancelledError):
        await tasks()
    name = (
        "tests.test_outcomes.test_asyncio_cancelled_error_from_task_is_cancelled.<locals>.cancel_me"
    )
    assert observed.outcomes() == {(name, "cancelled"): 1}


async def test_tasks_of_an_object_never_called_are_skipped(observed: Observed) -> None:
    """A BackgroundTasks that is never run (response not sent): its tasks end as skipped."""
    import gc

    tasks = BackgroundTasks(telemetry=observed.telemetry)
    tasks.add_task(ok)
    tasks.add_task(sync_ok)
    del tasks
    gc.collect()
    assert observed.outcomes() == {(P + "ok", "skipped"): 1, (P + "sync_ok", "skipped"): 1}
    reasons = {e["reason"] for e in observed.logs.named("task.skipped")}
    assert reasons == {"the response carrying it was never sent"}


async def test_tasks_run_one_by_one_are_not_counted_again(observed: Observed) -> None:
    """Tasks awaited individually (not through the object) get one outcome each, no more."""
    import gc

    tasks = BackgroundTasks(telemetry=observed.telemetry)
    tasks.add_task(ok)
    for task in tasks.tasks:
        await task()
    del tasks, task
    gc.collect()
    assert observed.outcomes() == {(P + "ok", "success"): 1}


async def test_task_added_by_a_running_task_runs_and_is_counted(observed: Observed) -> None:
    """As in Starlette, a task appended while the tasks run is run too, and counted."""
    tasks = BackgroundTasks(telemetry=observed.telemetry)
    ran: list[str] = []

    async def second() -> None:
        ran.append("second")

    async def first() -> None:
        ran.append("first")
        tasks.add_task(second)

    tasks.add_task(first)
    await tasks()
    assert ran == ["first", "second"]
    assert sum(observed.outcomes().values()) == 2


async def test_log_events_without_a_span_carry_no_empty_ids() -> None:
    """span_mode="off": the events have no trace_id/span_id fields at all (not None)."""
    observed = make_observed(span_mode="off")
    tasks = BackgroundTasks(telemetry=observed.telemetry)
    tasks.add_task(fails)
    tasks.add_task(ok)
    with pytest.raises(ValueError, match="bad value"):
        await tasks()
    events = observed.logs.events
    assert [e["event"] for e in events] == ["task.failed", "task.skipped"]
    for event in events:
        assert "trace_id" not in event, event
        assert "span_id" not in event, event
