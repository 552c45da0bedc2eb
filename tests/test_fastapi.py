"""FastAPI: the background-tasks tutorial, dependencies, and the no-import-change path."""

from pathlib import Path
from typing import Annotated, Any

import fastapi
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from starlette.background import BackgroundTasks as StarletteBackgroundTasks

import taskscope
from taskscope import BackgroundTasks, instrument_app
from tests.conftest import Observed

FASTAPI_VERSION = tuple(int(p) for p in fastapi.__version__.split(".")[:2])


def tutorial_app(log_file: Path, observed: Observed) -> FastAPI:
    """The FastAPI tutorial: a path operation and a dependency both add tasks."""
    app = FastAPI()

    def write_log(message: str) -> None:
        with log_file.open("a") as log:
            log.write(message)

    def get_query(background_tasks: BackgroundTasks, q: str | None = None) -> str | None:
        if q:
            background_tasks.add_task(write_log, f"found query: {q}\n")
        return q

    @app.post("/send-notification/{email}")
    async def send_notification(
        email: str, background_tasks: BackgroundTasks, q: Annotated[str | None, Depends(get_query)]
    ) -> dict[str, str]:
        background_tasks.add_task(write_log, f"message to {email}\n")
        return {"message": "Message sent"}

    instrument_app(app, observed.telemetry)
    return app


def test_tutorial_dependency_and_path_operation(tmp_path: Path, observed: Observed) -> None:
    """Tasks from the dependency and the path operation run in order, both observed."""
    log_file = tmp_path / "log.txt"
    with TestClient(tutorial_app(log_file, observed)) as client:
        response = client.post("/send-notification/foo@example.com?q=some-query")
    assert response.status_code == 200
    assert response.json() == {"message": "Message sent"}
    assert log_file.read_text() == "found query: some-query\nmessage to foo@example.com\n"
    name = "tests.test_fastapi.tutorial_app.<locals>.write_log"
    assert observed.outcomes() == {(name, "success"): 2.0}
    assert len(observed.task_spans()) == 2


def test_one_shared_object_through_sub_dependencies(observed: Observed) -> None:
    """Path op, dependency and sub-dependency share one taskscope object; order kept."""
    app = FastAPI()
    seen_objects: list[Any] = []
    order: list[str] = []

    def note(label: str) -> None:
        order.append(label)

    def sub_dependency(tasks: BackgroundTasks) -> None:
        seen_objects.append(tasks)
        tasks.add_task(note, "sub")

    def dependency(tasks: BackgroundTasks, _: None = Depends(sub_dependency)) -> None:
        seen_objects.append(tasks)
        tasks.add_task(note, "dep")

    @app.get("/")
    def endpoint(tasks: BackgroundTasks, _: None = Depends(dependency)) -> str:
        seen_objects.append(tasks)
        tasks.add_task(note, "endpoint")
        return "ok"

    instrument_app(app, observed.telemetry)
    with TestClient(app) as client:
        client.get("/")
    assert order == ["sub", "dep", "endpoint"]
    assert len({id(obj) for obj in seen_objects}) == 1
    shared = seen_objects[0]
    assert isinstance(shared, taskscope.BackgroundTasks)
    assert isinstance(shared, fastapi.BackgroundTasks)
    assert isinstance(shared, StarletteBackgroundTasks)
    assert sum(observed.outcomes().values()) == 3


def test_plain_fastapi_import_is_instrumented_by_instrument_app(observed: Observed) -> None:
    """Routes still annotated with fastapi.BackgroundTasks are observed after instrument_app."""
    app = FastAPI()
    ran: list[int] = []

    async def job(n: int) -> None:
        ran.append(n)

    @app.get("/")
    async def endpoint(tasks: fastapi.BackgroundTasks) -> str:
        tasks.add_task(job, 1)
        return "ok"

    instrument_app(app, observed.telemetry)
    with TestClient(app) as client:
        client.get("/")
    assert ran == [1]
    assert observed.outcomes() == {
        (
            "tests.test_fastapi.test_plain_fastapi_import_is_instrumented_by_instrument_app.<locals>.job",
            "success",
        ): 1.0
    }


def test_failure_in_fastapi_skips_rest(observed: Observed) -> None:
    """A failing task: counted, logged, the next one skipped and counted, error propagates."""
    app = FastAPI()

    def fails() -> None:
        raise ConnectionError("smtp down")

    def after() -> None:
        raise AssertionError("must not run")

    @app.get("/")
    def endpoint(tasks: BackgroundTasks) -> str:
        tasks.add_task(fails)
        tasks.add_task(after)
        return "ok"

    instrument_app(app, observed.telemetry)
    with TestClient(app) as client, pytest.raises(ConnectionError):
        client.get("/")
    prefix = "tests.test_fastapi.test_failure_in_fastapi_skips_rest.<locals>."
    assert observed.outcomes() == {
        (prefix + "fails", "failure"): 1.0,
        (prefix + "after", "skipped"): 1.0,
    }
    assert [e["event"] for e in observed.logs.events] == ["task.failed", "task.skipped"]


@pytest.mark.skipif(FASTAPI_VERSION < (0, 142), reason="FastAPI's own telemetry needs >= 0.142")
def test_one_task_span_with_fastapi_native_telemetry(observed: Observed) -> None:
    """With FastAPI's own telemetry on, each task gets exactly one span: FastAPI's
    (tests/test_fastapi_telemetry.py has the whole matrix)."""
    app = FastAPI(telemetry={"tracer_provider": observed.tracer_provider})  # type: ignore[call-arg,unused-ignore]

    async def job() -> None: ...

    @app.get("/")
    async def endpoint(tasks: BackgroundTasks) -> str:
        tasks.add_task(job)
        return "ok"

    instrument_app(app, observed.telemetry)
    with TestClient(app) as client:
        client.get("/")
    names = [s.name for s in observed.spans()]
    assert names.count("fastapi.background_task") == 1
    assert observed.task_spans() == []
    (task_span,) = [s for s in observed.spans() if s.name == "fastapi.background_task"]
    request_spans = [s for s in observed.spans() if s.name.startswith("GET")]
    assert request_spans, names
    assert task_span.context.trace_id == request_spans[0].context.trace_id
