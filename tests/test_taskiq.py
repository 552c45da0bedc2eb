"""taskscope.taskiq against a real redis-server and a real ``taskiq worker`` process.

The test process sends through its own broker (with a test's own telemetry) to the queue a
``taskiq worker tests.taskiqapp:broker`` consumes; the worker's metrics, spans and log
events are read from its endpoint and files.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from taskiq.kicker import AsyncKicker

from taskscope import BackgroundTasks
from taskscope.taskiq import TaskscopeMiddleware, queued
from tests import taskiqapp
from tests.conftest import Observed, make_observed
from tests.queue_services import Worker, running_worker, settle_equal

pytestmark = pytest.mark.slow

Q = "taskscope-taskiq"
P = "tests.taskiqapp."
EXPECTED = {
    (P + "ok", "success"): 2,  # once through queued() after a response, once kicked
    (P + "fails", "failure"): 1,
    (P + "fails_then_retried", "retry"): 1,  # SimpleRetryMiddleware re-sends it once
    (P + "fails_then_retried", "failure"): 1,  # then gives up (max_retries=2)
    (P + "blocks_the_loop", "success"): 1,
    (P + "sync_ok", "success"): 1,
}


@dataclass
class Run:
    worker: Worker
    publisher: Observed
    statuses: list[int]


def totals(worker: Worker) -> dict[tuple[str, str], float]:
    return {
        (dict(labels)["task"], dict(labels)["outcome"]): value
        for (name, labels), value in worker.scrape().items()
        if name == "taskscope_tasks_total" and value
    }


async def _workload(redis_url: str, publisher: Observed) -> list[int]:
    broker = taskiqapp.make_broker(redis_url, Q, TaskscopeMiddleware(publisher.telemetry))
    # The client declares the task by name, as a web app that does not import the
    # worker's modules would; its function is the worker's own.
    remote_ok = broker.task(task_name="tests.taskiqapp:ok")(taskiqapp.ok.original_func)
    tracer = publisher.tracer_provider.get_tracer("test")

    async def report(request: Request) -> Response:
        tasks = BackgroundTasks(telemetry=publisher.telemetry)
        with tracer.start_as_current_span("request"):
            tasks.add_task(queued(remote_ok), 7)
        return Response("queued", background=tasks)

    async def broken(request: Request) -> Response:
        tasks = BackgroundTasks(telemetry=publisher.telemetry)
        tasks.add_task(queued(remote_ok), 8)
        raise RuntimeError("the endpoint fails after add_task")

    app = Starlette(routes=[Route("/report", report), Route("/broken", broken)])
    await broker.startup()
    try:
        statuses = []
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            statuses.append((await client.get("/report")).status_code)
            statuses.append((await client.get("/broken")).status_code)
        kicker: AsyncKicker[Any, Any] = AsyncKicker("tests.taskiqapp:ok", broker, {})
        await kicker.kiq(1)
        for name in ("fails", "fails_then_retried", "blocks_the_loop", "sync_ok"):
            labels: dict[str, Any] = {}
            if name == "fails_then_retried":
                labels = {"retry_on_error": True, "max_retries": 2}
            await AsyncKicker(f"tests.taskiqapp:{name}", broker, labels).kiq()
    finally:
        await broker.shutdown()
    return statuses


@pytest.fixture(scope="module")
def run(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    publisher = make_observed()
    env = {"TASKSCOPE_TEST_BROKER": redis_url, "TASKSCOPE_TEST_QUEUE": Q}
    command = [
        sys.executable, "-m", "taskiq", "worker", "tests.taskiqapp:broker",
        "--workers", "1", "--log-level", "INFO",
    ]  # fmt: skip
    try:
        with running_worker(
            tmp_path_factory.mktemp("taskiq"), command, env, multiprocess=False
        ) as worker:
            statuses = anyio.run(_workload, redis_url, publisher)
            settle_equal(lambda: totals(worker), EXPECTED, what="the taskiq outcomes")
            yield Run(worker, publisher, statuses)
    finally:
        publisher.tracer_provider.shutdown()


def test_exact_outcomes_named_from_the_task_name(run: Run) -> None:
    """One outcome per run; names are the task names (taskiq renames the function)."""
    assert totals(run.worker) == EXPECTED
    assert run.statuses == [200, 500]
    assert not [key for key in run.worker.scrape() if "__taskiq_original" in str(key)]


def test_waits_and_in_progress(run: Run) -> None:
    """Every stamped run has a wait; nothing is left in progress."""
    samples = run.worker.scrape()
    assert samples[("taskscope_task_wait_seconds_count", (("task", P + "ok"),))] == 2
    assert all(v == 0 for (n, _), v in samples.items() if n == "taskscope_tasks_in_progress")


def test_loop_probe_sees_a_task_blocking_the_worker_loop(run: Run) -> None:
    """The loop probe runs in the async worker: a 300 ms block shows as lag."""
    samples = run.worker.scrape()
    count = samples[("taskscope_event_loop_lag_seconds_count", ())]
    under = samples[("taskscope_event_loop_lag_seconds_bucket", (("le", "0.25"),))]
    assert count - under >= 1


def test_trace_chains_from_request_to_worker(run: Run) -> None:
    """request -> in-process publish task -> PRODUCER -> worker CONSUMER, one trace."""
    local = run.publisher.spans()
    (request,) = [s for s in local if s.name == "request"]
    (bg,) = [s for s in local if s.name == f"background_task publish:{P}ok"]
    (producer,) = [
        s
        for s in local
        if s.name == f"publish {P}ok" and s.parent and s.parent.span_id == bg.context.span_id
    ]
    assert producer.kind == SpanKind.PRODUCER
    producer_id = f"{producer.context.span_id:016x}"
    (consumer,) = [
        s
        for s in run.worker.spans()
        if s["name"] == f"background_task {P}ok" and s["parent_id"] == producer_id
    ]
    assert consumer["kind"] == "CONSUMER"
    assert consumer["trace_id"] == f"{request.context.trace_id:032x}"
    # The in-process span shape: the same attribute names (no unit suffixes).
    assert isinstance(consumer["attributes"]["taskscope.task.wait"], float)
    assert "taskscope.task.wait_s" not in consumer["attributes"]


def test_failed_endpoint_sends_nothing(run: Run) -> None:
    """queued() sends after the response; an endpoint that raises sends nothing."""
    assert run.publisher.outcomes()[(f"publish:{P}ok", "success")] == 1
    sent = [s for s in run.publisher.spans() if s.name == f"publish {P}ok"]
    assert len(sent) == 2  # /report and the direct kick


def test_failure_log_matches_the_span(run: Run) -> None:
    """task.failed carries the failing CONSUMER span's ids."""
    (span,) = [s for s in run.worker.spans() if s["name"] == f"background_task {P}fails"]
    assert span["status"] == "ERROR"
    (logged,) = [
        e for e in run.worker.logs() if e["event"] == "task.failed" and e["task"] == P + "fails"
    ]
    assert (logged["trace_id"], logged["span_id"]) == (span["trace_id"], span["span_id"])


def test_queued_needs_a_taskiq_task() -> None:
    """queued() refuses a plain function (it would never reach the queue)."""
    with pytest.raises(TypeError, match="taskiq task"):
        queued(print)


def test_span_says_how_the_worker_ran_the_task(run: Run) -> None:
    """taskscope.task.sync: True for a ``def`` task (thread pool), False for ``async def``."""
    spans = {s["name"]: s for s in run.worker.spans() if s["kind"] == "CONSUMER"}
    assert spans[f"background_task {P}sync_ok"]["attributes"]["taskscope.task.sync"] is True
    assert spans[f"background_task {P}ok"]["attributes"]["taskscope.task.sync"] is False
