"""instrument()/uninstrument(): process-wide, imports unchanged (run in a subprocess)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from starlette.applications import Starlette
from starlette.background import BackgroundTasks as StarletteBackgroundTasks
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from taskscope import instrument_app
from tests.conftest import Observed, make_observed


def test_instrument_and_uninstrument_process_wide() -> None:
    """instrument() observes plain Starlette tasks everywhere; uninstrument() stops it."""
    code = textwrap.dedent(
        """
        from prometheus_client import REGISTRY
        from starlette.applications import Starlette
        from starlette.background import BackgroundTasks
        from starlette.responses import Response
        from starlette.routing import Route
        from starlette.testclient import TestClient
        import taskscope

        def job() -> None: ...

        async def endpoint(request):
            tasks = BackgroundTasks()
            tasks.add_task(job)
            return Response("ok", background=tasks)

        app = Starlette(routes=[Route("/", endpoint)])
        labels = {"task": "__main__.job", "outcome": "success"}
        taskscope.instrument()
        TestClient(app).get("/")
        assert REGISTRY.get_sample_value("taskscope_tasks_total", labels) == 1.0
        taskscope.uninstrument()
        TestClient(app).get("/")
        assert REGISTRY.get_sample_value("taskscope_tasks_total", labels) == 1.0
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def _plain_tasks_app(ran: list[str]) -> Starlette:
    """A Starlette app whose route adds one task with Starlette's own classes."""

    def job() -> None:
        ran.append("job")

    async def endpoint(request: Request) -> Response:
        tasks = StarletteBackgroundTasks()
        tasks.add_task(job)
        return Response("ok", background=tasks)

    return Starlette(routes=[Route("/", endpoint)])


def test_instrument_app_scopes_plain_tasks_to_the_app(observed: Observed) -> None:
    """Plain Starlette tasks are observed in the instrumented app only."""
    other = make_observed()
    ran: list[str] = []
    instrumented, plain = _plain_tasks_app(ran), _plain_tasks_app(ran)
    instrument_app(instrumented, observed.telemetry)
    with TestClient(instrumented) as a, TestClient(plain) as b:
        a.get("/")
        b.get("/")
    assert ran == ["job", "job"]
    assert sum(observed.outcomes().values()) == 1
    assert other.outcomes() == {}


def test_instrument_app_again_swaps_settings_and_uninstrument_app_undoes() -> None:
    """A second instrument_app (even on a started app) swaps the settings without a second
    middleware; uninstrument_app stops observing and restores Starlette's classes."""
    from starlette.background import BackgroundTask as StarletteBackgroundTask

    from taskscope import uninstrument_app

    original_call = StarletteBackgroundTask.__call__
    first, second = make_observed(), make_observed()
    ran: list[str] = []
    app = _plain_tasks_app(ran)
    with TestClient(app) as client:
        client.get("/")  # started before taskscope is involved at all
        instrument_app(app, first.telemetry)
        client.get("/")
        instrument_app(app, second.telemetry)
        client.get("/")
        assert StarletteBackgroundTask.__call__ is not original_call
        uninstrument_app(app)
        assert StarletteBackgroundTask.__call__ is original_call
        client.get("/")
    assert ran == ["job"] * 4
    assert sum(first.outcomes().values()) == 1
    assert sum(second.outcomes().values()) == 1
    assert app.user_middleware == []  # wrapped around the built stack, not added
