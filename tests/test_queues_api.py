"""The queue integrations' small parts, in process: import hygiene, the publish stamp and
the wait it gives, trace ids from headers, and the scoping of instrument_celery to its app
(Celery's eager mode runs the worker-side signals in this process)."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import textwrap

import pytest
from celery import Celery
from celery.exceptions import Ignore
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

import taskscope.celery
import taskscope.taskiq
from taskscope._queues import messages
from taskscope.celery import instrument_celery, uninstrument_celery
from tests.conftest import Observed

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize("module", [taskscope.celery, taskscope.taskiq])
def test_all_names_resolve(module: object) -> None:
    """Every name in __all__ exists."""
    for name in module.__all__:  # type: ignore[attr-defined]
        assert hasattr(module, name), name


def test_import_has_no_side_effects() -> None:
    """Importing the integrations connects no receiver, starts no thread, registers nothing."""
    code = textwrap.dedent(
        """
        import threading
        import prometheus_client
        from celery import signals
        before = set(prometheus_client.REGISTRY._names_to_collectors)
        import taskscope.celery, taskscope.taskiq
        assert threading.active_count() == 1, threading.enumerate()
        assert not signals.task_prerun.receivers and not signals.task_postrun.receivers
        assert set(prometheus_client.REGISTRY._names_to_collectors) == before
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_wait_counts_from_publish_or_a_later_eta() -> None:
    """Wait = now - max(published, ETA); never negative; no stamp, no wait."""
    published = 1_000_000.0
    eta_later = dt.datetime.fromtimestamp(published + 60, tz=dt.UTC)
    eta_earlier = dt.datetime.fromtimestamp(published - 60, tz=dt.UTC)
    assert messages.queue_wait(repr(published), None, published + 2.5) == 2.5
    assert messages.queue_wait(repr(published), eta_later.isoformat(), published + 61) == 1.0
    assert messages.queue_wait(repr(published), eta_later, published + 61) == 1.0
    assert messages.queue_wait(repr(published), eta_earlier.isoformat(), published + 1) == 1.0
    assert messages.queue_wait(repr(published), "not a date", published + 1) == 1.0
    assert messages.queue_wait(repr(published), None, published - 5) == 0.0  # clock skew
    assert messages.queue_wait(None, None, published) is None
    assert messages.queue_wait("garbage", None, published) is None


def test_stamp_carries_time_and_trace_context(observed: Observed) -> None:
    """stamp() writes the publish time and the W3C traceparent of the given span."""
    tracer = observed.tracer_provider.get_tracer("test")
    span = tracer.start_span("publish")
    headers: dict[str, object] = {}
    messages.stamp(headers, span)
    span.end()
    assert float(str(headers[messages.PUBLISHED_AT])) > 0
    trace_id = f"{span.get_span_context().trace_id:032x}"
    assert messages.trace_id_of_header(headers["traceparent"]) == trace_id


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (TRACEPARENT, "4bf92f3577b34da6a3ce929d0e0e4736"),
        (TRACEPARENT.upper().replace("00-", "00-", 1), "4bf92f3577b34da6a3ce929d0e0e4736"),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),
        ("00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01", None),
        ("00-4bf92f35", None),
        (None, None),
        (42, None),
    ],
)
def test_trace_id_of_header(header: object, expected: str | None) -> None:
    """The trace id of a traceparent header without a propagator; invalid ones give None."""
    assert messages.trace_id_of_header(header) == expected


def test_instrument_celery_records_only_its_own_app(observed: Observed) -> None:
    """Two apps in one process: only the instrumented one's tasks are recorded."""
    ours = Celery("ours", broker="memory://")
    other = Celery("other", broker="memory://")
    for app in (ours, other):
        app.conf.task_always_eager = True

    @ours.task(name="ours.work")
    def work() -> int:
        return 1

    @ours.task(name="ours.ignored")
    def ignored() -> None:
        raise Ignore

    @other.task(name="other.work")
    def other_work() -> int:
        return 1

    instrument_celery(ours, observed.telemetry)
    try:
        work.delay()
        ignored.delay()
        other_work.delay()
    finally:
        uninstrument_celery(ours)
    assert observed.outcomes() == {("ours.work", "success"): 1, ("ours.ignored", "skipped"): 1}
    assert [s.name for s in observed.task_spans()] == [
        "background_task ours.work",
        "background_task ours.ignored",
    ]


class _OpenSpans(SpanProcessor):
    """Counts spans started and not ended (a leaked span never reaches an exporter)."""

    def __init__(self) -> None:
        self.open = 0
        self.started = 0

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.open += 1
        self.started += 1

    def on_end(self, span: ReadableSpan) -> None:
        self.open -= 1


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_taskiq_send_failure_leaks_no_span(observed: Observed) -> None:
    """taskiq calls no middleware when sending fails: no producer span may stay open, and
    queued() (an in-process task) fails with the send error."""
    from taskiq.exceptions import SendTaskError
    from taskiq_redis import ListQueueBroker

    from taskscope.taskiq import TaskscopeMiddleware, queued

    spans = _OpenSpans()
    observed.tracer_provider.add_span_processor(spans)
    broker = ListQueueBroker("redis://127.0.0.1:9", queue_name="nowhere").with_middlewares(
        TaskscopeMiddleware(observed.telemetry)
    )

    @broker.task(task_name="tests.unsent")
    async def unsent() -> None: ...

    publish = queued(unsent)
    with pytest.raises(SendTaskError):
        await publish()
    await broker.shutdown()
    assert spans.started == 1
    assert spans.open == 0
    assert publish.__taskscope_name__ == "publish:tests.unsent"
