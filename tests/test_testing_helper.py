"""taskscope.testing: capture(), assert_no_blocking() and the taskscope_guard pytest fixture."""

from __future__ import annotations

import os

import pytest

from taskscope import BackgroundTasks
from taskscope.testing import assert_no_blocking, capture
from tests.conftest import make_observed
from tests.scenarios import blocking, markers, quiet

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.anyio
BLOCKING_FILE = os.path.realpath(blocking.__file__)


async def test_capture_records_tasks_and_blocks(anyio_backend: str) -> None:
    """capture(telemetry) sees every TaskRecord and one BlockRecord per blocking step."""
    obs = make_observed()
    with capture(obs.telemetry) as captured:
        tasks = BackgroundTasks(telemetry=obs.telemetry)
        tasks.add_task(blocking.sleeps)
        tasks.add_task(quiet.sync_sleeps)
        await tasks()
    assert [(t.name, t.outcome) for t in captured.tasks] == [
        ("tests.scenarios.blocking.sleeps", "success"),
        ("tests.scenarios.quiet.sync_sleeps", "success"),
    ]
    (block,) = captured.blocks
    assert block.task == "tests.scenarios.blocking.sleeps"
    assert block.location in markers(BLOCKING_FILE, "sleep")
    assert block.duration >= 0.25
    assert [d.ongoing for d in captured.detections] == [True]
    assert captured.tasks[0].loop_blocks == 1


async def test_capture_without_telemetry_sees_every_telemetry(anyio_backend: str) -> None:
    """capture() with no argument also covers a Telemetry created inside the block."""
    with capture() as captured:
        obs = make_observed()
        tasks = BackgroundTasks(telemetry=obs.telemetry)
        tasks.add_task(quiet.sleeps_async)
        await tasks()
    assert [t.name for t in captured.tasks] == ["tests.scenarios.quiet.sleeps_async"]


async def test_assert_no_blocking_names_task_and_line(anyio_backend: str) -> None:
    """assert_no_blocking raises with the task name and file:line of the block."""
    obs = make_observed()
    tasks = BackgroundTasks(telemetry=obs.telemetry)
    tasks.add_task(blocking.nested)
    with pytest.raises(AssertionError) as info, assert_no_blocking(obs.telemetry):
        await tasks()
    message = str(info.value)
    assert "tests.scenarios.blocking.nested" in message
    (where,) = markers(BLOCKING_FILE, "nested")
    assert where in message


async def test_assert_no_blocking_passes_quiet_tasks(anyio_backend: str) -> None:
    """Waiting tasks pass; a threshold above the block length ignores it."""
    obs = make_observed()
    with assert_no_blocking(obs.telemetry):
        tasks = BackgroundTasks(telemetry=obs.telemetry)
        tasks.add_task(quiet.sleeps_async)
        await tasks()
    with assert_no_blocking(obs.telemetry, threshold=0.5):
        tasks = BackgroundTasks(telemetry=obs.telemetry)
        tasks.add_task(blocking.sleeps)
        await tasks()


def test_threshold_below_the_telemetrys_is_refused() -> None:
    """A threshold the probe cannot see is an error, not a silent pass."""
    obs = make_observed(block_threshold=0.1)
    with (
        pytest.raises(ValueError, match="block_threshold"),
        assert_no_blocking(obs.telemetry, threshold=0.01),
    ):
        pass


GUARDED = """
import time
import pytest
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient
from taskscope import BackgroundTasks

pytest_plugins = ["taskscope.testing"]

async def blocks():
    time.sleep(0.25)  # the culprit

async def fails():
    raise ValueError("boom")

async def fine():
    pass

def app_for(guard, task):
    async def endpoint(request):
        tasks = BackgroundTasks(telemetry=guard.telemetry)
        tasks.add_task(task)
        return Response("ok", background=tasks)
    return Starlette(routes=[Route("/", endpoint)])

def test_blocking(taskscope_guard):
    with TestClient(app_for(taskscope_guard, blocks)) as client:
        client.get("/")

def test_failing(taskscope_guard):
    with TestClient(app_for(taskscope_guard, fails)) as client:
        try:
            client.get("/")
        except ValueError:
            pass

def test_fine(taskscope_guard):
    with TestClient(app_for(taskscope_guard, fine)) as client:
        client.get("/")

def test_allowed(taskscope_guard):
    taskscope_guard.allow_blocking = True
    with TestClient(app_for(taskscope_guard, blocks)) as client:
        client.get("/")
"""


def test_guard_fixture_fails_blocking_and_failing_tests(pytester: pytest.Pytester) -> None:
    """The plugin's fixture fails tests whose tasks blocked or failed, naming task and line."""
    path = pytester.makepyfile(test_guarded=GUARDED)
    culprit = next(
        number
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if line.endswith("# the culprit")
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=2, failed=2)
    output = result.stdout.str()
    assert "task test_guarded.blocks blocked the event loop for" in output
    assert f"test_guarded.py:{culprit}" in output
    assert "task test_guarded.fails failed with ValueError: boom" in output


MODULE_LEVEL = """
import time
import pytest
from fastapi import BackgroundTasks, FastAPI
from fastapi.testclient import TestClient
from taskscope import instrument_app

pytest_plugins = ["taskscope.testing"]

app = FastAPI()  # the usual module-level app, plain FastAPI import

async def blocks():
    time.sleep(0.25)  # the culprit

async def fails():
    raise ValueError("boom")

async def fine():
    pass

JOBS = {"blocks": blocks, "fails": fails, "fine": fine}

@app.get("/{job}")
async def endpoint(job: str, background: BackgroundTasks):
    background.add_task(JOBS[job])
    return "ok"

client = TestClient(app)

def test_fine_1(taskscope_guard):
    client.get("/fine")

def test_instrumented_per_test(taskscope_guard):
    instrument_app(app, taskscope_guard.telemetry)  # again on a started app: no error
    client.get("/fine")

def test_instrumented_again(taskscope_guard):
    instrument_app(app, taskscope_guard.telemetry)
    client.get("/fine")
    assert [e["event"] for e in taskscope_guard.logs] == []

def test_blocking(taskscope_guard):
    client.get("/blocks")

def test_failing_task_raises_into_the_test(taskscope_guard):
    client.get("/fails")

def test_own_assertion_keeps_its_failure(taskscope_guard):
    client.get("/blocks")
    assert False, "the test's own failure"

def test_fine_2(taskscope_guard):
    client.get("/fine")
"""


def test_guard_with_a_module_level_app(pytester: pytest.Pytester) -> None:
    """One module-level app across many tests, instrumented or not: each problem is one
    failure (no extra teardown error), and a test's own failure keeps the guard's note."""
    pytester.makepyfile(test_module_level=MODULE_LEVEL)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=4, failed=3, errors=0)
    output = result.stdout.str()
    assert "test_blocking - Failed: taskscope_guard:" in output
    assert "task test_module_level.blocks blocked the event loop for" in output
    assert "FAILED test_module_level.py::test_failing_task_raises_into_the_test" in output
    assert "task test_module_level.fails failed with ValueError: boom" in output
    assert "the test's own failure" in output
