"""The span contract: name, kind, parent or link, attributes, error reporting."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from taskscope import BackgroundTasks
from tests.conftest import Observed, make_observed

pytestmark = pytest.mark.usefixtures("both_record_paths")


def _app_with_request_span(
    observed: Observed, *funcs: object, sync_route: bool = False
) -> Starlette:
    tracer = observed.tracer_provider.get_tracer("test")

    def add_all(tasks: BackgroundTasks) -> None:
        for func in funcs:
            tasks.add_task(func)  # type: ignore[arg-type]

    async def async_endpoint(request: Request) -> Response:
        tasks = BackgroundTasks(telemetry=observed.telemetry)
        with tracer.start_as_current_span("request"):
            add_all(tasks)
        return Response("ok", background=tasks)

    def sync_endpoint(request: Request) -> Response:
        tasks = BackgroundTasks(telemetry=observed.telemetry)
        with tracer.start_as_current_span("request"):
            add_all(tasks)
        return Response("ok", background=tasks)

    return Starlette(routes=[Route("/", sync_endpoint if sync_route else async_endpoint)])


async def ok_task() -> None: ...


def failing_task() -> None:
    raise KeyError("x" * 10_000)


def test_child_span_shape(observed: Observed) -> None:
    """Child mode: INTERNAL span named after the task, parented to the request span."""
    with TestClient(_app_with_request_span(observed, ok_task)) as client:
        client.get("/")
    (request,) = [s for s in observed.spans() if s.name == "request"]
    (span,) = observed.task_spans()
    assert span.name == "background_task tests.test_spans.ok_task"
    assert span.kind == SpanKind.INTERNAL
    assert span.parent is not None
    assert span.parent.span_id == request.context.span_id
    assert span.context.trace_id == request.context.trace_id
    attrs = dict(span.attributes or {})
    assert attrs["code.function.name"] == "tests.test_spans.ok_task"
    assert attrs["taskscope.task.sync"] is False
    assert attrs["taskscope.task.outcome"] == "success"
    assert isinstance(attrs["taskscope.task.wait"], float)
    assert span.status.status_code == StatusCode.UNSET
    assert not any(key.startswith("taskscope.arg") for key in attrs)


def test_context_captured_in_sync_route(observed: Observed) -> None:
    """Context set in a sync (threadpool) route is kept: the task is its child."""
    with TestClient(_app_with_request_span(observed, ok_task, sync_route=True)) as client:
        client.get("/")
    (request,) = [s for s in observed.spans() if s.name == "request"]
    (span,) = observed.task_spans()
    assert span.parent is not None
    assert span.parent.span_id == request.context.span_id


def test_failure_span(observed: Observed) -> None:
    """Failure: status ERROR, error.type, an exception event with a truncated message."""
    with TestClient(
        _app_with_request_span(observed, failing_task), raise_server_exceptions=False
    ) as client:
        client.get("/")
    (span,) = observed.task_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == "KeyError"
    (event,) = [e for e in span.events if e.name == "exception"]
    attrs = dict(event.attributes or {})
    assert attrs["exception.type"] == "KeyError"
    message = str(attrs["exception.message"])
    assert len(message) < 300
    assert message.endswith("…[truncated]")
    stacktrace = str(attrs["exception.stacktrace"])
    assert stacktrace.startswith("Traceback (most recent call last):")
    assert "in failing_task" in stacktrace
    assert stacktrace.rstrip().splitlines()[-1].startswith("KeyError")
    assert "exception.escaped" not in attrs  # deprecated in the semantic conventions


def test_link_mode_starts_a_new_trace() -> None:
    """Link mode: the task span is a root linked to the request span."""
    observed = make_observed(span_mode="link")
    with TestClient(_app_with_request_span(observed, ok_task)) as client:
        client.get("/")
    (request,) = [s for s in observed.spans() if s.name == "request"]
    (span,) = observed.task_spans()
    assert span.parent is None
    assert span.context.trace_id != request.context.trace_id
    assert [link.context.span_id for link in span.links] == [request.context.span_id]


def test_span_mode_off_records_metrics_only() -> None:
    """span_mode='off': no spans, metrics still recorded."""
    observed = make_observed(span_mode="off")
    with TestClient(_app_with_request_span(observed, ok_task)) as client:
        client.get("/")
    assert observed.task_spans() == []
    assert (
        observed.value("taskscope_tasks_total", task="tests.test_spans.ok_task", outcome="success")
        == 1
    )


def test_task_span_is_current_inside_the_task(observed: Observed) -> None:
    """Spans the task creates are children of the task span (sync and async)."""
    tracer = observed.tracer_provider.get_tracer("inner")

    async def async_inner() -> None:
        with tracer.start_as_current_span("inner-async"):
            pass

    def sync_inner() -> None:
        with tracer.start_as_current_span("inner-sync"):
            pass

    with TestClient(_app_with_request_span(observed, async_inner, sync_inner)) as client:
        client.get("/")
    by_name = {s.name: s for s in observed.spans()}
    for inner, task in (("inner-async", "async_inner"), ("inner-sync", "sync_inner")):
        parent = by_name[inner].parent
        task_span = next(s for s in observed.task_spans() if s.name.endswith("." + task))
        assert parent is not None
        assert parent.span_id == task_span.context.span_id
    assert trace.get_current_span() is trace.INVALID_SPAN
