"""Hostile input through a real app: nothing raises into it, nothing breaks, nothing leaks."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from taskscope import BackgroundTasks, instrument_app, task_name
from taskscope._naming import callable_name
from taskscope._safe import type_name
from taskscope.exposition import MetricsApp
from tests.conftest import Observed, make_observed
from tests.hostile_types import RaisingMeta
from tests.system_tools import system_tool

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
CANARY = "zq81CANARYx7"


class HostileCallable(metaclass=RaisingMeta):
    def __init__(self, ran: list[str]) -> None:
        self.ran = ran

    async def __call__(self) -> None:
        self.ran.append("hostile")


def app_with(observed: Observed, add: Any) -> Starlette:
    """A Starlette app: /work adds tasks with ``add(tasks)``; /metrics serves the registry."""

    async def work(request: Request) -> Response:
        tasks = BackgroundTasks()
        add(tasks)
        return Response("ok", background=tasks)

    app = Starlette(
        routes=[
            Route("/work", work),
            Route("/metrics", MetricsApp(observed.registry, gzip=False)),
        ]
    )
    instrument_app(app, observed.telemetry)
    return app


def scrape_both_formats(client: TestClient) -> list[str]:
    """Both exposition formats answer 200 and parse (prometheus_client's parsers)."""
    bodies = []
    for accept in ("text/plain", OPENMETRICS):
        response = client.get("/metrics", headers={"Accept": accept})
        assert response.status_code == 200, response.text
        bodies.append(response.text)
    list(parse_text(bodies[0]))
    list(parse_openmetrics(bodies[1]))  # type: ignore[no-untyped-call]
    return bodies


def promtool_accepts(text: str) -> None:
    """``promtool check metrics`` (classic text format) finds no error."""
    promtool = system_tool("promtool", "prometheus")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    # Exit 0: clean; 3: lint warnings only (e.g. counter naming); 1: a parse error.
    assert result.returncode in (0, 3), result.stderr + result.stdout
    assert "error" not in (result.stderr + result.stdout).lower()


def test_a_hostile_callable_runs_and_the_rest_of_the_response_too(observed: Observed) -> None:
    """__qualname__/__module__ that raise: the task and those after it run, recorded once."""
    ran: list[str] = []

    def add(tasks: BackgroundTasks) -> None:
        tasks.add_task(ran.append, "first")
        tasks.add_task(HostileCallable(ran))
        tasks.add_task(ran.append, "last")

    with TestClient(app_with(observed, add)) as client:
        assert client.get("/work").status_code == 200
    assert ran == ["first", "hostile", "last"]
    outcomes = observed.outcomes()
    assert outcomes[("tests.test_hostile_inputs.HostileCallable", "success")] == 1
    assert sum(outcomes.values()) == 3
    assert len(observed.task_spans()) == 3
    assert observed.value("taskscope_instrumentation_errors_total", signal="tracing") == 0


def test_one_bad_task_name_never_breaks_metrics(observed: Observed) -> None:
    """A lone surrogate, NUL and a newline in a name: every scrape still parses."""

    @task_name("files.report_\udcff\x00\nname")
    def bad() -> None: ...

    def add(tasks: BackgroundTasks) -> None:
        tasks.add_task(bad)

    with TestClient(app_with(observed, add)) as client:
        client.get("/work")
        text, _ = scrape_both_formats(client)
        client.get("/work")
        scrape_both_formats(client)  # and the next scrape too
    assert 'task="files.report_\\\\udcff\\\\x00\\\\x0aname"' in text
    promtool_accepts(text)
    names = {span.name for span in observed.task_spans()}
    assert names == {"background_task files.report_\\udcff\\x00\\x0aname"}


def test_an_unencodable_label_of_another_collector_is_escaped(observed: Observed) -> None:
    """The app's own metric with a lone surrogate does not break taskscope's /metrics."""
    counter = Counter("app_files", "Files \udcff", ["name"], registry=observed.registry)
    counter.labels(name="bad\udcff").inc()
    with TestClient(app_with(observed, lambda tasks: None)) as client:
        text, openmetrics = scrape_both_formats(client)
    assert 'app_files_total{name="bad\\\\udcff"} 1.0' in text
    assert 'name="bad\\\\udcff"' in openmetrics
    promtool_accepts(text)


def test_error_types_are_bounded_and_the_overflow_counted() -> None:
    """30 exception classes from one task: 5 series + __other__; 25 overflows counted."""
    observed = make_observed(max_error_types_per_task=5, loop_probe=False)
    errors = [type(f"Error{i}", (Exception,), {}) for i in range(30)]

    def fail(index: int) -> None:
        raise errors[index]()

    for index in range(30):
        tasks = BackgroundTasks(telemetry=observed.telemetry)
        tasks.add_task(fail, index)
        with pytest.raises(errors[index]):
            _run(tasks)
    task = callable_name(fail)
    series = {
        s.labels["error_type"]: s.value
        for m in observed.registry.collect()
        if m.name == "taskscope_task_failures"
        for s in m.samples
        if s.name.endswith("_total")
    }
    prefix = "tests.test_hostile_inputs."  # module.QualName, the form of the span's error.type
    assert series == {**{f"{prefix}Error{i}": 1.0 for i in range(5)}, "__other__": 25.0}
    kind = "error_type_overflow"
    assert observed.value("taskscope_task_warnings_total", task=task, kind=kind) == 25
    (event,) = observed.logs.named("task.error_type_overflow")  # logged once
    assert (event["limit"], event["limit_per_task"]) == (1000, 5)
    otel = {
        point.attributes["error.type"]
        for metric in _otel_metrics(observed)
        if metric.name == "taskscope.task.failures"
        for point in metric.data.data_points
    }
    assert otel == {*(f"{prefix}Error{i}" for i in range(5)), "__other__"}
    (failed,) = {e["error_type"] for e in observed.logs.named("task.failed")[-1:]}
    assert failed == f"{prefix}Error29"  # a log line is no label: it keeps the class


def test_the_overall_error_type_cap_holds_across_tasks() -> None:
    """max_error_types bounds the (task, error_type) pairs of all tasks together."""
    observed = make_observed(max_error_types=3, max_error_types_per_task=10, loop_probe=False)
    for index in range(6):

        @task_name(f"t{index}")
        def fail() -> None:
            raise ValueError

        tasks = BackgroundTasks(telemetry=observed.telemetry)
        tasks.add_task(fail)
        with pytest.raises(ValueError):
            _run(tasks)
    pairs = [
        (s.labels["task"], s.labels["error_type"])
        for m in observed.registry.collect()
        if m.name == "taskscope_task_failures"
        for s in m.samples
        if s.name.endswith("_total")
    ]
    assert sorted(pairs)[:3] == [("t0", "ValueError"), ("t1", "ValueError"), ("t2", "ValueError")]
    assert sorted(pairs)[3:] == [(f"t{i}", "__other__") for i in range(3, 6)]


def test_task_name_overflow_is_counted_and_logged_once() -> None:
    """Past max_task_names, each task named __other__ is counted; one log line."""
    observed = make_observed(max_task_names=2, loop_probe=False)
    for index in range(5):
        tasks = BackgroundTasks(telemetry=observed.telemetry)
        tasks.add_task(task_name(f"n{index}")(lambda: None))
        _run(tasks)
    assert observed.value("taskscope_tasks_total", task="__other__", outcome="success") == 3
    kind = "task_name_overflow"
    assert observed.value("taskscope_task_warnings_total", task="__other__", kind=kind) == 3
    (event,) = observed.logs.named("task.task_name_overflow")
    assert event["limit"] == 2


def test_a_secret_in_a_task_name_is_redacted_everywhere(observed: Observed) -> None:
    """Names are user data: a token in a name never reaches metrics, spans or logs."""

    @task_name(f"reports.export?token={CANARY}")
    def export() -> None:
        raise RuntimeError(f"failed for {{'password': b'{CANARY}'}}")

    def add(tasks: BackgroundTasks) -> None:
        tasks.add_task(export)

    with (
        TestClient(app_with(observed, add), raise_server_exceptions=False) as client,
    ):
        client.get("/work")
        bodies = scrape_both_formats(client)
    assert 'task="reports.export?token=***"' in bodies[0]
    outputs = [*bodies, repr(observed.logs.events)]
    outputs += [span.to_json() for span in observed.spans()]
    assert not [out for out in outputs if CANARY in out]


def _run(tasks: BackgroundTasks) -> None:
    import anyio

    anyio.run(tasks)


def _otel_metrics(observed: Observed) -> list[Any]:
    data = observed.metric_reader.get_metrics_data()
    assert data is not None
    return [
        metric
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    ]


def test_metrics_app_over_an_empty_registry_still_parses() -> None:
    """Sanity of the helpers above: an empty registry scrapes and parses."""
    observed = make_observed()
    observed.registry = CollectorRegistry()
    with TestClient(app_with(observed, lambda tasks: None)) as client:
        scrape_both_formats(client)


def _exception_event(observed: Observed) -> dict[str, Any]:
    (span,) = observed.task_spans()
    (event,) = [e for e in span.events if e.name == "exception"]
    return dict(event.attributes or {})


def _encoded_event_keys(observed: Observed) -> set[str]:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    request = encode_spans(observed.task_spans())
    (span,) = [s for r in request.resource_spans for sc in r.scope_spans for s in sc.spans]
    (event,) = [e for e in span.events if e.name == "exception"]
    return {attribute.key for attribute in event.attributes}


def test_a_lone_surrogate_in_a_message_reaches_otlp_escaped() -> None:
    """Default redaction: the message is escaped, so the OTLP encoder keeps it."""
    observed = make_observed(loop_probe=False)

    def fail() -> None:
        raise ValueError("file report_\udcff.csv unreadable")

    tasks = BackgroundTasks(telemetry=observed.telemetry)
    tasks.add_task(fail)
    with pytest.raises(ValueError):
        _run(tasks)
    assert _exception_event(observed)["exception.message"] == "file report_\\udcff.csv unreadable"
    assert "exception.message" in _encoded_event_keys(observed)


def test_a_custom_redactor_cannot_make_a_message_unencodable() -> None:
    """Whatever Telemetry.redact returns, the recorded message is encodable (safe_message)."""
    observed = make_observed(loop_probe=False, redact=lambda text: text)

    def fail() -> None:
        raise ValueError("file report_\udcff.csv unreadable")

    tasks = BackgroundTasks(telemetry=observed.telemetry)
    tasks.add_task(fail)
    with pytest.raises(ValueError):
        _run(tasks)
    assert "exception.message" in _encoded_event_keys(observed)


class NamelessMeta(type):
    """Exception classes of this metaclass raise when asked for their name or module."""

    def __getattribute__(cls, name: str) -> Any:
        if name in ("__module__", "__qualname__", "__name__"):
            raise RuntimeError(f"no {name}")
        return super().__getattribute__(name)


class NamelessError(Exception, metaclass=NamelessMeta):
    pass


def test_a_hostile_exception_class_costs_neither_the_outcome_nor_the_span() -> None:
    """The task's own exception propagates; one failure, one span with error.type."""
    observed = make_observed(loop_probe=False)
    error = NamelessError("boom")

    def fail() -> None:
        raise error

    tasks = BackgroundTasks(telemetry=observed.telemetry)
    tasks.add_task(fail)
    raised: BaseException | None = None
    try:
        _run(tasks)
    except BaseException as exc:
        raised = exc
    # Failures are reported without the exception chain: pytest's report would ask the
    # hostile class for its name, and crash.
    problem = None
    if raised is not error:
        problem = f"another exception propagated: {type_name(raised)}"
    elif sum(observed.outcomes().values()) != 1:
        problem = f"outcomes: {observed.outcomes()}"
    elif len(observed.task_spans()) != 1:
        problem = f"{len(observed.task_spans())} task spans"
    else:
        expected = "tests.test_hostile_inputs.NamelessError"
        (span,) = observed.task_spans()
        if (span.attributes or {}).get("error.type") != expected:
            problem = f"error.type {(span.attributes or {}).get('error.type')!r}"
        elif _exception_event(observed)["exception.type"] != expected:
            problem = "exception.type"
    del raised
    if problem is not None:
        pytest.fail(problem, pytrace=False)


def test_cancellations_do_not_use_up_the_error_type_cap() -> None:
    """Only failures' error types are labels: a cancelled task takes no slot of the cap."""
    import asyncio

    observed = make_observed(max_error_types_per_task=1, loop_probe=False)

    @task_name("jobs.flaky")
    async def cancelled() -> None:
        raise asyncio.CancelledError

    @task_name("jobs.flaky")
    def failing() -> None:
        raise ValueError

    first = BackgroundTasks(telemetry=observed.telemetry)
    first.add_task(cancelled)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(first())
    second = BackgroundTasks(telemetry=observed.telemetry)
    second.add_task(failing)
    with pytest.raises(ValueError):
        _run(second)
    labels = {"task": "jobs.flaky", "error_type": "ValueError"}
    assert observed.value("taskscope_task_failures_total", **labels) == 1
    assert observed.outcomes() == {("jobs.flaky", "cancelled"): 1, ("jobs.flaky", "failure"): 1}
