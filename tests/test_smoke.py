"""Quick end-to-end checks of the drop-in through a Starlette app and the test client."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from taskscope import BackgroundTasks
from tests.conftest import Observed


def test_tasks_run_in_order_and_are_recorded(observed: Observed, anyio_backend: str) -> None:
    """Two tasks run after the response, in order, each with a span and a success count."""
    ran: list[str] = []

    async def first() -> None:
        ran.append("first")

    def second() -> None:
        ran.append("second")

    async def endpoint(request: Request) -> Response:
        tasks = BackgroundTasks(telemetry=observed.telemetry)
        tasks.add_task(first)
        tasks.add_task(second)
        return Response("ok", background=tasks)

    app = Starlette(routes=[Route("/", endpoint)])
    with TestClient(app, backend=anyio_backend) as client:  # type: ignore[arg-type,unused-ignore]
        assert client.get("/").text == "ok"
    assert ran == ["first", "second"]
    prefix = "tests.test_smoke.test_tasks_run_in_order_and_are_recorded.<locals>."
    assert observed.outcomes() == {
        (prefix + "first", "success"): 1.0,
        (prefix + "second", "success"): 1.0,
    }
    assert [s.name for s in observed.task_spans()] == [
        f"background_task {prefix}first",
        f"background_task {prefix}second",
    ]
