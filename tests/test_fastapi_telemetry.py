"""taskscope beside FastAPI's own telemetry (FastAPI >= 0.142): one span per task.

With FastAPI's telemetry tracing a request, the task's span is FastAPI's
``fastapi.background_task``, in the tracer provider FastAPI uses for the app; taskscope
records its metrics and log events with that span's ids. With FastAPI's telemetry off,
the span is taskscope's ``background_task {task}``. Whatever the way taskscope is on.
"""

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import fastapi
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import taskscope
from tests.conftest import Observed

FASTAPI_VERSION = tuple(int(p) for p in fastapi.__version__.split(".")[:2])
pytestmark = pytest.mark.skipif(
    FASTAPI_VERSION < (0, 142), reason="FastAPI's own telemetry needs FastAPI >= 0.142"
)


class AppTracing:
    """A tracer provider of the app's own, given to FastAPI (not the global one)."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def task_spans(self) -> list[ReadableSpan]:
        return [
            s for s in self.exporter.get_finished_spans() if s.name == "fastapi.background_task"
        ]

    def server_span(self) -> ReadableSpan:
        (span,) = [s for s in self.exporter.get_finished_spans() if s.name.startswith("GET")]
        return span


@pytest.fixture
def app_tracing() -> Iterator[AppTracing]:
    tracing = AppTracing()
    yield tracing
    tracing.provider.shutdown()


@pytest.fixture(params=["dropin", "instrument_app", "instrument"])
def way(request: pytest.FixtureRequest) -> Iterator[str]:
    """The three ways taskscope is switched on."""
    yield str(request.param)
    taskscope.uninstrument()


def _app(way: str, observed: Observed, telemetry: dict[str, Any], task: Any) -> FastAPI:
    app = FastAPI(telemetry=telemetry)  # type: ignore[call-arg,arg-type,unused-ignore]
    annotation: Any = taskscope.BackgroundTasks if way == "dropin" else fastapi.BackgroundTasks

    async def endpoint(background: annotation) -> str:
        background.add_task(task)
        background.add_task(task)
        return "ok"

    app.get("/")(endpoint)
    if way == "instrument":
        taskscope.instrument()
    return taskscope.TelemetryMiddleware(app, observed.telemetry)  # type: ignore[return-value]


def test_task_span_is_fastapis_in_the_apps_provider(
    way: str, observed: Observed, app_tracing: AppTracing, anyio_backend: str
) -> None:
    """One span per task: FastAPI's, in the app's provider; current inside the task."""
    seen: list[Any] = []

    async def job() -> None:
        span = trace.get_current_span()
        seen.append((span.is_recording(), getattr(span, "name", None), span.get_span_context()))

    app = _app(way, observed, {"tracer_provider": app_tracing.provider}, job)
    client = TestClient(app, backend=anyio_backend)  # type: ignore[arg-type,unused-ignore]
    assert client.get("/").text == '"ok"'
    tasks = app_tracing.task_spans()
    assert len(tasks) == 2
    assert observed.task_spans() == []  # none of taskscope's own: no duplicates
    assert [(True, "fastapi.background_task", s.context) for s in tasks] == seen
    server = app_tracing.server_span()
    assert all(s.parent is not None and s.parent.span_id == server.context.span_id for s in tasks)
    assert all(
        s.attributes == {"code.function.name": f"{job.__module__}.{job.__qualname__}"}
        for s in tasks
    )
    # The metrics and log events link to FastAPI's span.
    assert sum(observed.outcomes().values()) == 2.0


def test_failure_keeps_fastapis_shape_and_links_the_record(
    way: str, observed: Observed, app_tracing: AppTracing
) -> None:
    """A failing task: FastAPI's error.type and status; taskscope's log has its ids."""

    async def job() -> None:
        raise ValueError("boom")

    app = _app(way, observed, {"tracer_provider": app_tracing.provider}, job)
    assert TestClient(app, raise_server_exceptions=False).get("/").status_code == 200
    (task,) = app_tracing.task_spans()
    assert task.status.status_code == StatusCode.ERROR
    assert task.attributes is not None
    assert task.attributes["error.type"] == "ValueError"
    assert not task.events
    (failed,) = [e for e in observed.logs.events if e["event"] == "task.failed"]
    assert failed["trace_id"] == format(task.context.trace_id, "032x")
    assert failed["span_id"] == format(task.context.span_id, "016x")
    assert [k for k, n in observed.outcomes().items() if n] == [
        (f"{job.__module__}.{job.__qualname__}", "failure"),
        (f"{job.__module__}.{job.__qualname__}", "skipped"),
    ]


@pytest.mark.parametrize(
    "setting", [{"tracing": False}, {"operation_spans": False}, {"exclude": lambda scope: True}]
)
def test_fastapi_tracing_off_gives_taskscopes_span(
    way: str, observed: Observed, app_tracing: AppTracing, setting: dict[str, Any]
) -> None:
    """FastAPI not tracing the task: taskscope's own span, one per task."""

    async def job() -> None: ...

    app = _app(way, observed, {"tracer_provider": app_tracing.provider, **setting}, job)
    assert TestClient(app).get("/").text == '"ok"'
    assert app_tracing.task_spans() == []
    assert len(observed.task_spans()) == 2


def test_unsampled_by_the_app_gives_no_task_span(
    way: str, observed: Observed, app_tracing: AppTracing
) -> None:
    """The app's sampler said no: no task span anywhere, the tasks still recorded."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    app_tracing.provider.sampler = ALWAYS_OFF

    async def job() -> None: ...

    app = _app(way, observed, {"tracer_provider": app_tracing.provider}, job)
    assert TestClient(app).get("/").text == '"ok"'
    assert app_tracing.exporter.get_finished_spans() == ()
    assert observed.task_spans() == []
    assert sum(observed.outcomes().values()) == 2.0


SCRIPT = """
import taskscope
taskscope.instrument()  # before FastAPI is imported (the opentelemetry-instrument case)
from fastapi import BackgroundTasks, FastAPI
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
app = FastAPI(telemetry={"tracer_provider": provider})

async def job():
    pass

@app.get("/")
async def endpoint(background: BackgroundTasks):
    background.add_task(job)
    return "ok"

user_made = BackgroundTasks()
user_made.add_task(job)

@app.get("/own")
async def own():
    from fastapi.responses import JSONResponse
    return JSONResponse("ok", background=user_made)

client = TestClient(app)
client.get("/")
client.get("/own")
print(sorted(s.name for s in exporter.get_finished_spans() if "background" in s.name))
"""


def test_instrument_before_fastapi_is_imported() -> None:
    """``instrument()`` before ``import fastapi``: still one span per task."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.strip() == str(["fastapi.background_task"] * 2), result.stderr
