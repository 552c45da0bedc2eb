"""taskscope.celery against a real redis-server and real ``celery worker`` processes.

One prefork worker (``-c 2``, prometheus_client multiprocess mode, metrics on its own port)
runs a workload once per module: a request that publishes through ``queued()``, an
endpoint that fails after ``add_task`` (nothing may be published), and one task per
outcome, including the pitfalls (hard time limit, a pool process killed mid-task,
``revoke(terminate=True)``, an unregistered task). The tests then read the worker's
``/metrics``, its span and log files, and the publishing side's in-memory telemetry.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from taskscope import BackgroundTasks
from taskscope.celery import instrument_celery, queued, uninstrument_celery
from tests import celeryapp
from tests.conftest import Observed, make_observed
from tests.queue_services import Worker, celery_command, running_worker, settle, settle_equal

pytestmark = pytest.mark.slow

Q = "taskscope-celery-prefork"
P = "tests.celeryapp."
# Every (task, outcome) the workload produces, exactly.
EXPECTED = {
    (P + "ok", "success"): 2,  # one through queued() after a response, one with a countdown
    (P + "fails", "failure"): 2,
    (P + "retry_once", "retry"): 1,
    (P + "retry_once", "success"): 1,
    (P + "ignored", "skipped"): 1,
    (P + "rejected", "rejected"): 1,
    (P + "over_hard_limit", "failure"): 1,  # Celery sends task_failure twice for it
    (P + "dies", "abandoned"): 1,  # its pool process is killed mid-task
    (P + "sleeps", "revoked"): 2,  # revoked before it started; expired
    (P + "sleeps", "cancelled"): 1,  # revoke(terminate=True) while running
    ("no.such.task", "rejected"): 1,  # unregistered in the worker
}


def use_broker(redis_url: str) -> None:
    """Point the shared test app at the session's redis (before its first connection)."""
    if celeryapp.app.conf.broker_url != redis_url:
        celeryapp.app.conf.broker_url = redis_url


def totals(worker: Worker) -> dict[tuple[str, str], float]:
    return {
        (dict(labels)["task"], dict(labels)["outcome"]): value
        for (name, labels), value in worker.scrape().items()
        if name == "taskscope_tasks_total" and value
    }


def ping_ready() -> bool:
    return bool(celeryapp.app.control.ping(timeout=0.5))


@dataclass
class Run:
    worker: Worker
    publisher: Observed
    report_status: int
    broken_status: int


def _web_app(observed: Observed) -> Starlette:
    tracer = observed.tracer_provider.get_tracer("test")

    async def report(request: Request) -> Response:
        tasks = BackgroundTasks(telemetry=observed.telemetry)
        with tracer.start_as_current_span("request"):
            tasks.add_task(queued(celeryapp.ok, queue=Q), 7)
        return Response("queued", background=tasks)

    async def broken(request: Request) -> Response:
        tasks = BackgroundTasks(telemetry=observed.telemetry)
        tasks.add_task(queued(celeryapp.ok, queue=Q), 8)
        raise RuntimeError("the endpoint fails after add_task")

    return Starlette(routes=[Route("/report", report), Route("/broken", broken)])


@pytest.fixture(scope="module")
def run(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    use_broker(redis_url)
    publisher = make_observed()
    instrument_celery(celeryapp.app, publisher.telemetry)
    env = {"TASKSCOPE_TEST_BROKER": redis_url, "TASKSCOPE_TEST_QUEUE": Q}
    workdir: Path = tmp_path_factory.mktemp("celery-prefork")
    try:
        with running_worker(
            workdir, celery_command(Q, "prefork"), env, multiprocess=True, ready=ping_ready
        ) as worker:
            with TestClient(_web_app(publisher), raise_server_exceptions=False) as client:
                report_status = client.get("/report").status_code
                broken_status = client.get("/broken").status_code
            _publish_workload()
            _revoke_and_terminate(worker)
            settle_equal(lambda: totals(worker), EXPECTED, what="the outcomes")
            yield Run(worker, publisher, report_status, broken_status)
    finally:
        uninstrument_celery(celeryapp.app)
        publisher.tracer_provider.shutdown()


def _publish_workload() -> None:
    for _ in range(2):
        celeryapp.fails.apply_async(queue=Q)
    celeryapp.retry_once.apply_async(queue=Q)
    celeryapp.ignored.apply_async(queue=Q)
    celeryapp.rejected.apply_async(queue=Q)
    celeryapp.ok.apply_async((1,), countdown=1, queue=Q)
    celeryapp.app.send_task("no.such.task", queue=Q)
    revoked_id = str(uuid.uuid4())
    celeryapp.app.control.revoke(revoked_id)
    celeryapp.sleeps.apply_async((0,), task_id=revoked_id, queue=Q)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    celeryapp.sleeps.apply_async((0,), expires=past, queue=Q)
    celeryapp.over_hard_limit.apply_async(queue=Q)
    celeryapp.dies.apply_async(queue=Q)


def _revoke_and_terminate(worker: Worker) -> None:
    result = celeryapp.sleeps.apply_async((30,), queue=Q)
    settle(
        lambda: worker.value("taskscope_tasks_in_progress", task=P + "sleeps") == 1 or None,
        what="the long task to start",
    )
    celeryapp.app.control.revoke(result.id, terminate=True)


def test_one_outcome_per_published_task(run: Run) -> None:
    """Exact counts per (task, outcome) from a prefork worker's merged metrics."""
    assert totals(run.worker) == EXPECTED
    assert run.report_status == 200
    assert run.broken_status == 500


def test_failures_by_exception_class(run: Run) -> None:
    """task_failures_total by class: one TimeLimitExceeded although Celery sends it twice."""
    failures = {
        dict(labels)["error_type"]: value
        for (name, labels), value in run.worker.scrape().items()
        if name == "taskscope_task_failures_total" and value
    }
    timeout = "billiard.exceptions.TimeLimitExceeded"  # module.QualName, as in process
    assert failures == {"ValueError": 2, timeout: 1}
    timeouts = [
        entry
        for entry in run.worker.logs()
        if entry["event"] == "task.failed" and entry["error_type"] == timeout
    ]
    assert len(timeouts) == 1


def test_no_run_time_for_tasks_that_never_ran(run: Run) -> None:
    """Revoked, expired and unregistered tasks count, but have no duration series."""
    durations = {
        (dict(labels)["task"], dict(labels)["outcome"]): value
        for (name, labels), value in run.worker.scrape().items()
        if name == "taskscope_task_duration_seconds_count"
    }
    assert (P + "sleeps", "revoked") not in durations
    assert ("no.such.task", "rejected") not in durations
    assert durations[(P + "sleeps", "cancelled")] == 1  # terminated: it ran
    assert durations[(P + "rejected", "rejected")] == 1  # Reject raised while running
    assert durations[(P + "retry_once", "retry")] == 1


def test_in_progress_returns_to_zero_after_killed_pool_processes(run: Run) -> None:
    """Pool processes killed mid-task (hard limit, SIGKILL, terminate) leave no +1."""
    gauges = {
        dict(labels)["task"]: value
        for (name, labels), value in run.worker.scrape().items()
        if name == "taskscope_tasks_in_progress"
    }
    assert gauges  # the series exist
    assert all(value == 0 for value in gauges.values()), gauges


def test_wait_counts_from_publish_or_eta(run: Run) -> None:
    """Every run of a stamped task has a wait (the ETA case: the solo worker test)."""
    samples = run.worker.scrape()
    labels = (("task", P + "ok"),)
    assert samples[("taskscope_task_wait_seconds_count", labels)] == 2
    # A retried attempt's wait counts from its own publish.
    assert samples[("taskscope_task_wait_seconds_count", (("task", P + "retry_once"),))] == 2


def _span(spans: list[Any], name: str) -> Any:
    (found,) = [s for s in spans if s.name == name]
    return found


def test_trace_chains_from_request_to_worker(run: Run) -> None:
    """request -> in-process publish task -> PRODUCER -> worker CONSUMER, one trace."""
    local = run.publisher.spans()
    request = _span(local, "request")
    bg = _span(local, f"background_task publish:{P}ok")
    (producer,) = [
        s
        for s in local
        if s.name == f"publish {P}ok" and s.parent and s.parent.span_id == bg.context.span_id
    ]
    assert bg.parent is not None
    assert bg.parent.span_id == request.context.span_id
    assert producer.kind == SpanKind.PRODUCER
    assert dict(producer.attributes or {})["messaging.system"] == "celery"
    producer_id = f"{producer.context.span_id:016x}"
    consumers = [
        s
        for s in run.worker.spans()
        if s["name"] == f"background_task {P}ok" and s["parent_id"] == producer_id
    ]
    (consumer,) = consumers
    assert consumer["kind"] == "CONSUMER"
    assert consumer["trace_id"] == f"{request.context.trace_id:032x}"
    assert consumer["attributes"]["code.function.name"] == P + "ok"


def test_failed_endpoint_publishes_nothing(run: Run) -> None:
    """queued() publishes after the response; an endpoint that raises publishes nothing."""
    local = run.publisher.spans()
    publishes = [s for s in local if s.name == f"publish {P}ok"]
    assert len(publishes) == 2  # /report and the countdown, not /broken
    assert run.publisher.outcomes()[(f"publish:{P}ok", "success")] == 1


def test_worker_failure_span_and_log_agree(run: Run) -> None:
    """A failed task: ERROR span with error.type, task.failed log with the same ids."""
    spans = [s for s in run.worker.spans() if s["name"] == f"background_task {P}fails"]
    assert len(spans) == 2
    assert {s["status"] for s in spans} == {"ERROR"}
    assert {s["attributes"]["error.type"] for s in spans} == {"ValueError"}
    logged = {
        (e["trace_id"], e["span_id"])
        for e in run.worker.logs()
        if e["event"] == "task.failed" and e["task"] == P + "fails"
    }
    assert logged == {(s["trace_id"], s["span_id"]) for s in spans}


def test_publish_failure_ends_the_producer_span(observed: Observed) -> None:
    """after_task_publish is not sent when a publish fails: the span still ends, as ERROR."""
    from celery import Celery

    app = Celery("unreachable", broker="redis://127.0.0.1:9/0")  # nothing listens there
    app.conf.broker_connection_timeout = 0.5

    @app.task(name="tests.unreachable")
    def unreachable() -> None: ...

    instrument_celery(app, observed.telemetry)
    try:
        with pytest.raises(Exception):  # kombu's OperationalError
            unreachable.apply_async(retry=False)
    finally:
        uninstrument_celery(app)
    (span,) = observed.spans()
    assert span.name == "publish tests.unreachable"
    assert span.end_time is not None
    assert span.status.status_code == StatusCode.ERROR
    assert not trace.get_current_span().get_span_context().is_valid
    assert (
        observed.value(
            "taskscope_task_warnings_total", task="tests.unreachable", kind="publish_failed"
        )
        == 1
    )
    (logged,) = observed.logs.named("task.publish_failed")
    assert logged["task"] == "tests.unreachable"
    assert logged["trace_id"] == f"{span.context.trace_id:032x}"


def test_uninstrument_restores_the_app(observed: Observed) -> None:
    """uninstrument_celery disconnects the receivers and restores the task sender."""
    from celery import Celery, signals

    app = Celery("restored", broker="memory://")
    before = app.amqp.send_task_message
    receivers = len(signals.task_prerun.receivers)
    instrument_celery(app, observed.telemetry)
    assert app.amqp.send_task_message is not before
    assert instrument_celery(app) is instrument_celery(app)  # idempotent
    assert len(signals.task_prerun.receivers) == receivers + 1
    uninstrument_celery(app)
    assert app.amqp.send_task_message is before
    assert len(signals.task_prerun.receivers) == receivers


def test_queued_needs_a_celery_task() -> None:
    """queued() refuses a plain function (it would never reach the queue)."""
    with pytest.raises(TypeError, match="Celery task"):
        queued(print)


SOLO_Q = "taskscope-celery-solo"


@dataclass
class SoloRun:
    worker: Worker
    publisher: Observed


@contextmanager
def _solo_worker(redis_url: str, workdir: Path, queue: str, **env: str) -> Iterator[SoloRun]:
    use_broker(redis_url)
    publisher = make_observed()
    instrument_celery(celeryapp.app, publisher.telemetry)
    full_env = {"TASKSCOPE_TEST_BROKER": redis_url, "TASKSCOPE_TEST_QUEUE": queue, **env}
    try:
        with running_worker(
            workdir,
            celery_command(queue, "solo", 1),
            full_env,
            multiprocess=False,
            ready=ping_ready,
        ) as worker:
            celeryapp.ok.apply_async((1,), queue=queue)
            celeryapp.fails.apply_async(queue=queue)
            celeryapp.retry_once.apply_async(queue=queue)
            celeryapp.ignored.apply_async(queue=queue)
            yield SoloRun(worker, publisher)
    finally:
        uninstrument_celery(celeryapp.app)
        publisher.tracer_provider.shutdown()


SOLO_EXPECTED = {
    (P + "ok", "success"): 1,
    (P + "fails", "failure"): 1,
    (P + "retry_once", "retry"): 1,
    (P + "retry_once", "success"): 1,
    (P + "ignored", "skipped"): 1,
}


def test_solo_worker_single_process_metrics(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """--pool=solo (no multiprocess mode): the same exact counts, spans and waits; a
    countdown's wait counts from its ETA, not from the publish 2 s earlier."""
    workdir = tmp_path_factory.mktemp("celery-solo")
    expected = {**SOLO_EXPECTED, (P + "ok", "success"): 2}
    with _solo_worker(redis_url, workdir, SOLO_Q) as solo:
        celeryapp.ok.apply_async((2,), countdown=2, queue=SOLO_Q)
        settle_equal(lambda: totals(solo.worker), expected, what="the solo outcomes")
        samples = solo.worker.scrape()
    # One process: nothing to warn about (the prefork warning is for pool processes).
    assert "task.prefork_without_multiprocess" not in {e["event"] for e in solo.worker.logs()}
    ok = (("task", P + "ok"),)
    assert samples[("taskscope_task_wait_seconds_count", ok)] == 2
    # Measured from the publish, the countdown task would have waited at least 2 s.
    assert samples[("taskscope_task_wait_seconds_bucket", (("le", "1.0"), *ok))] == 2
    assert all(
        value == 0 for (name, _), value in samples.items() if name == "taskscope_tasks_in_progress"
    )
    names = sorted(s["name"] for s in solo.worker.spans() if s["kind"] == "CONSUMER")
    assert names == sorted(
        f"background_task {P}{task}"
        for task in ("ok", "ok", "fails", "retry_once", "retry_once", "ignored")
    )


def test_no_duplicate_spans_with_opentelemetry_instrumentation_celery(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """With the contrib instrumentation on in the worker, its spans stand alone and the
    log events carry their ids; the metrics are unchanged."""
    workdir = tmp_path_factory.mktemp("celery-otel")
    queue = "taskscope-celery-otel"
    with _solo_worker(redis_url, workdir, queue, TASKSCOPE_TEST_OTEL_CELERY="1") as solo:
        settle_equal(lambda: totals(solo.worker), SOLO_EXPECTED, what="the outcomes")
        spans = solo.worker.spans()
        logs = solo.worker.logs()
    assert not [s for s in spans if s["name"].startswith(("background_task", "publish "))]
    consumers = [s for s in spans if s["kind"] == "CONSUMER"]
    assert sorted(s["name"] for s in consumers) == sorted(
        f"run/{P}{task}" for task in ("ok", "fails", "retry_once", "retry_once", "ignored")
    )
    (fails_span,) = [s for s in consumers if s["name"] == f"run/{P}fails"]
    (failed,) = [e for e in logs if e["event"] == "task.failed"]
    assert (failed["trace_id"], failed["span_id"]) == (
        fails_span["trace_id"],
        fails_span["span_id"],
    )
    # The trace still continues from the publisher's producer span.
    producers = {
        f"{s.context.span_id:016x}" for s in solo.publisher.spans() if s.name == f"publish {P}fails"
    }
    assert fails_span["parent_id"] in producers


def test_prefork_without_multiprocess_mode_warns(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A prefork worker without PROMETHEUS_MULTIPROC_DIR would export almost nothing of its
    pool processes: taskscope says so at start (log event and warnings counter)."""
    use_broker(redis_url)
    queue = "taskscope-celery-prefork-single"
    env = {"TASKSCOPE_TEST_BROKER": redis_url, "TASKSCOPE_TEST_QUEUE": queue}
    workdir = tmp_path_factory.mktemp("celery-prefork-single")
    with running_worker(
        workdir, celery_command(queue, "prefork"), env, multiprocess=False, ready=ping_ready
    ) as worker:
        warned = worker.value(
            "taskscope_task_warnings_total", task="__worker__", kind="prefork_without_multiprocess"
        )
        events = [e["event"] for e in worker.logs()]
    assert warned == 1
    assert events.count("task.prefork_without_multiprocess") == 1
