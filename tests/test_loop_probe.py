"""Lifecycle of the loop probe: one per loop, started lazily or explicitly, gone with the loop."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import pytest
import trio
import uvloop
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

import taskscope
from taskscope import BackgroundTasks, _stepping
from taskscope._probe import _probes, lifespan, probe_for
from taskscope._run import TaskRun
from taskscope._runtime import runtime_of
from taskscope._stepping import StepMonitor, TimedCoroutine
from tests.conftest import Observed, make_observed
from tests.scenarios import blocking

WATCHDOG = "taskscope-loop-watchdog"


def watchdogs() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == WATCHDOG]


async def one_task(obs: Observed, func: Any = None) -> None:
    tasks = BackgroundTasks(telemetry=obs.telemetry)
    if func is None:
        tasks.add_task(asyncio.sleep, 0)
    else:
        tasks.add_task(func)
    await tasks()


def test_no_thread_or_task_at_import() -> None:
    """Importing taskscope starts nothing: no thread, no probe."""
    code = (
        "import threading, taskscope, taskscope._probe, taskscope._stepping, taskscope.testing\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "assert len(taskscope._probe._probes) == 0\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_started_lazily_and_stopped_with_asyncio_run() -> None:
    """The first task starts the probe; asyncio.run's end stops it and restores the factory."""
    obs = make_observed()
    seen: dict[str, Any] = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        seen["loop"] = loop
        assert loop not in _probes
        assert watchdogs() == []
        await one_task(obs)
        assert loop in _probes
        seen["factory"] = loop.get_task_factory()
        seen["threads"] = watchdogs()
        await asyncio.sleep(0.25)

    asyncio.run(main())
    assert seen["factory"] is not None  # installed while running
    assert seen["loop"].get_task_factory() is None  # restored
    assert len(seen["threads"]) == 1
    assert not seen["threads"][0].is_alive()
    assert watchdogs() == []
    assert obs.value("taskscope_event_loop_lag_seconds_count") >= 2


def test_one_probe_per_loop_shared_by_every_telemetry() -> None:
    """Two Telemetry objects on one loop share one probe; both get lag samples."""
    first, second = make_observed(), make_observed()

    async def main() -> None:
        await one_task(first)
        await one_task(second)
        probe = probe_for(runtime_of(first.telemetry))
        assert probe is probe_for(runtime_of(second.telemetry))
        assert len(watchdogs()) == 1
        await asyncio.sleep(0.25)

    asyncio.run(main())
    assert first.value("taskscope_event_loop_lag_seconds_count") >= 2
    assert second.value("taskscope_event_loop_lag_seconds_count") >= 2
    assert watchdogs() == []


@pytest.mark.parametrize("runner", ["asyncio", "trio"])
def test_started_explicitly(runner: str) -> None:
    """start_loop_probe() measures lag before any task ran; the loop's end stops it."""
    obs = make_observed()

    async def main() -> None:
        await taskscope.start_loop_probe(obs.telemetry)
        await taskscope.start_loop_probe(obs.telemetry)  # idempotent
        assert len(watchdogs()) == 1
        if runner == "trio":
            await trio.sleep(0.35)
        else:
            await asyncio.sleep(0.35)

    if runner == "trio":
        trio.run(main)
    else:
        asyncio.run(main())
    assert obs.value("taskscope_event_loop_lag_seconds_count") >= 2
    assert watchdogs() == []


def test_trio_run_stops_cleanly() -> None:
    """Under trio.run: blocks detected (task and child), watchdog ended with the run."""
    obs = make_observed()

    async def main() -> None:
        await one_task(obs, blocking.sleeps)
        await one_task(obs, blocking.task_group)

    trio.run(main)
    events = obs.logs.named("task.loop_blocked")
    assert [e["task"] for e in events] == [
        "tests.scenarios.blocking.sleeps",
        "tests.scenarios.blocking.task_group",
    ]
    assert watchdogs() == []
    assert len(_probes) == 0


@pytest.mark.parametrize("style", ["runner", "uvloop.run"])
def test_uvloop(style: str) -> None:
    """Under uvloop: blocks detected and attributed, lag recorded, everything stops."""
    obs = make_observed(block_threshold=0.1)

    async def main() -> None:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        await one_task(obs, blocking.sleeps)
        await asyncio.sleep(0.15)

    if style == "runner":
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    else:
        uvloop.run(main())
    (event,) = obs.logs.named("task.loop_blocked")
    assert event["task"] == "tests.scenarios.blocking.sleeps"
    assert event["ongoing"] is True
    assert obs.value("taskscope_event_loop_lag_seconds_count") >= 1
    assert watchdogs() == []


def test_loop_closed_without_cancelling_its_tasks() -> None:
    """A loop closed with the heartbeat still pending: the watchdog notices and ends."""
    obs = make_observed()
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda loop, context: None)  # "Task was destroyed..."
    loop.run_until_complete(one_task(obs))
    assert len(watchdogs()) == 1
    loop.close()
    deadline = time.monotonic() + 2
    while watchdogs() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert watchdogs() == []
    assert loop not in _probes


def test_probe_off_installs_nothing() -> None:
    """loop_probe=False: no thread, no task factory, no lag, tasks still recorded."""
    obs = make_observed(loop_probe=False)

    async def main() -> None:
        await one_task(obs, blocking.sleeps)
        assert asyncio.get_running_loop().get_task_factory() is None
        assert watchdogs() == []

    asyncio.run(main())
    assert obs.logs.named("task.loop_blocked") == []
    assert obs.value("taskscope_event_loop_lag_seconds_count") == 0.0
    assert obs.outcomes() == {("tests.scenarios.blocking.sleeps", "success"): 1.0}


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_lifespan_runs_the_probe_for_the_app(backend: Literal["asyncio", "trio"]) -> None:
    """lifespan(telemetry) as the app's lifespan: probe from startup, stopped at shutdown."""
    obs = make_observed()
    during: list[int] = []

    async def endpoint(request: Request) -> Response:
        during.append(len(watchdogs()))
        return Response("ok")

    app = Starlette(routes=[Route("/", endpoint)], lifespan=lifespan(obs.telemetry))
    with TestClient(app, backend=backend) as client:
        assert client.get("/").text == "ok"
        time.sleep(0.25)  # the test client's loop runs in its own thread meanwhile
    assert during == [1]
    assert watchdogs() == []
    assert obs.value("taskscope_event_loop_lag_seconds_count") >= 1


def test_lifespan_nested_in_an_app_lifespan() -> None:
    """``async with lifespan(t):`` inside an app's own lifespan context manager."""
    obs = make_observed()

    @asynccontextmanager
    async def app_lifespan(app: Starlette) -> AsyncIterator[None]:
        async with lifespan(obs.telemetry):
            yield

    app = Starlette(lifespan=app_lifespan)
    with TestClient(app):
        assert len(watchdogs()) == 1
    assert watchdogs() == []


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    clock = FakeClock()
    monkeypatch.setattr(_stepping, "clock", clock)
    return clock


async def _suspends_here() -> None:
    await asyncio.sleep(0)  # suspended here


async def _samples_itself(clock: FakeClock, monitor: StepMonitor, delays: list[float]) -> None:
    clock.now += 0.05
    delays.append(monitor.sample(0.2))
    clock.now += 0.1
    monitor.sample(0.2)  # past the threshold: reported, ongoing
    monitor.sample(0.2)  # the same step: no second report
    clock.now += 0.05
    await asyncio.sleep(0)


async def _slow_then_suspend(clock: FakeClock) -> None:
    clock.now += 0.3
    await asyncio.sleep(0)  # slow step ends


def _run_for(obs: Observed) -> TaskRun:
    return TaskRun("tests.fake.task", runtime_of(obs.telemetry))


def test_watchdog_reports_once_and_the_end_reuses_its_sample(fake_clock: FakeClock) -> None:
    """Past the threshold the watchdog reports once (ongoing); the step's end completes it."""
    obs = make_observed(block_threshold=0.1)
    monitor = StepMonitor(threading.get_ident())
    delays: list[float] = []
    coro = _samples_itself(fake_clock, monitor, delays)
    timed = TimedCoroutine(coro, _run_for(obs), monitor)
    timed.send(None)  # one step; the watchdog's samples run inside it
    assert delays[0] == pytest.approx(0.051)  # before the threshold: sleep until it
    coro.close()
    events = obs.logs.named("task.loop_blocked")
    assert [e["ongoing"] for e in events] == [True]
    assert events[0]["duration_s"] == pytest.approx(0.15)
    assert obs.value("taskscope_task_loop_blocks_total", task="tests.fake.task") == 1.0
    assert obs.value("taskscope_task_loop_block_seconds_sum", task="tests.fake.task") == (
        pytest.approx(0.2)
    )
    (ended,) = obs.logs.named("task.loop_unblocked")
    assert ended["location"] == events[0]["location"]


def test_without_a_sample_the_end_blames_where_the_step_stopped(fake_clock: FakeClock) -> None:
    """No watchdog report (GIL held): the block is logged at the end, at the await it reached."""
    obs = make_observed(block_threshold=0.1)
    monitor = StepMonitor(threading.get_ident())
    coro = _slow_then_suspend(fake_clock)
    timed = TimedCoroutine(coro, _run_for(obs), monitor)
    timed.send(None)  # runs to the asyncio.sleep(0): a 0.3 s step, never sampled
    (event,) = obs.logs.named("task.loop_blocked")
    assert event["ongoing"] is False
    assert event["sampled"] is False
    assert event["duration_s"] == pytest.approx(0.3)
    with open(__file__) as source:
        lines = source.read().splitlines()
    line = next(n for n, text in enumerate(lines, start=1) if text.endswith("# slow step ends"))
    assert event["location"] == f"{__file__}:{line}"
    assert obs.value("taskscope_task_loop_blocks_total", task="tests.fake.task") == 1.0
    coro.close()


def test_a_step_that_ends_while_sampled_is_not_reported_twice(fake_clock: FakeClock) -> None:
    """The watchdog never reports a step that is no longer running (torn reads)."""
    obs = make_observed(block_threshold=0.1)
    monitor = StepMonitor(threading.get_ident())
    coro = _suspends_here()
    timed = TimedCoroutine(coro, _run_for(obs), monitor)
    outer = monitor.enter(timed)
    fake_clock.now += 0.01
    monitor.exit(timed, outer)
    fake_clock.now += 1.0  # long after the step ended: nothing current
    assert monitor.sample(0.05) == 0.05
    assert obs.logs.named("task.loop_blocked") == []
    assert _run_for(obs).busy == 0.0
    coro.close()


def test_nested_steps_split_busy_time(fake_clock: FakeClock) -> None:
    """A step inside another (eager child, nested run): each run gets its own share."""
    obs = make_observed(block_threshold=10.0)
    monitor = StepMonitor(threading.get_ident())
    outer_run, inner_run = _run_for(obs), _run_for(obs)
    c1, c2 = _suspends_here(), _suspends_here()
    a, b = TimedCoroutine(c1, outer_run, monitor), TimedCoroutine(c2, inner_run, monitor)
    top = monitor.enter(a)
    fake_clock.now += 1.0
    inner = monitor.enter(b)
    assert inner is a
    fake_clock.now += 2.0
    monitor.exit(b, inner)
    assert monitor.current is a
    fake_clock.now += 4.0
    monitor.exit(a, top)
    assert monitor.current is None
    assert inner_run.busy == pytest.approx(2.0)
    assert outer_run.busy == pytest.approx(5.0)
    c1.close()
    c2.close()
