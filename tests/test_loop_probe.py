"""Lifecycle of the loop probe: one per loop, started lazily or explicitly, gone with the loop."""

from __future__ import annotations

import asyncio
import contextvars
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
from taskscope._probe import LoopProbe, _probes, beat_for, lifespan, probe_for
from taskscope._run import TaskRun
from taskscope._runtime import runtime_of
from taskscope._stepping import OUTSIDE
from tests.conftest import Observed, make_observed
from tests.scenarios import blocking

pytestmark = pytest.mark.usefixtures("both_record_paths")

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
    """The first task starts the probe (no task factory); asyncio.run's end stops it."""
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
    assert seen["factory"] is None  # no task factory: children are blamed via their context
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


def test_a_stopped_loop_is_not_stalled() -> None:
    """Between two run_until_complete calls the heartbeat cannot run: not a stall."""
    obs = make_observed(block_threshold=0.05)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(one_task(obs))
        time.sleep(0.3)  # the loop is stopped (not closed): blocking.outside would be a stall
        loop.run_until_complete(asyncio.sleep(0.05))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0.01))
        loop.close()
    assert obs.logs.named("task.loop_blocked") == []


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


class FakeBlamer:
    """What the watchdog would find on the loop thread: ``run`` (None: not a task)."""

    def __init__(self, run: TaskRun | None) -> None:
        self.run = run

    def run_now(self) -> TaskRun | None:
        return self.run

    def blame(self) -> tuple[TaskRun | None, list[Any]]:
        return self.run, []


def _run_for(obs: Observed, name: str = "tests.fake.task") -> TaskRun:
    return TaskRun(name, runtime_of(obs.telemetry))


def _probe(clock: FakeClock, *observed: Observed, run: TaskRun | None) -> LoopProbe:
    """A probe driven by hand: no loop, no thread; the test plays heartbeat and watchdog."""
    probe = LoopProbe("asyncio", FakeClock(), observed[0].telemetry)
    for obs in observed:
        probe.subscribe(runtime_of(obs.telemetry))
    probe._blamer = FakeBlamer(run)  # type: ignore[assignment]
    probe.beat_at = clock.now
    probe.due = clock.now + probe.beat
    return probe


def _heartbeat_returns(probe: LoopProbe, clock: FakeClock) -> None:
    probe.came_back = probe.beat_at = clock.now
    probe.due = clock.now + probe.beat


def test_beat_is_a_fifth_of_the_threshold_within_bounds() -> None:
    assert beat_for(0.1) == pytest.approx(0.02)
    assert beat_for(1.0) == 0.025
    assert beat_for(0.001) == 0.002


HALF_BEAT = 0.01  # beat_for(0.1) / 2


def test_a_stall_is_reported_once_and_ended_by_the_heartbeat(fake_clock: FakeClock) -> None:
    """Past the threshold: one ongoing report; the heartbeat's return ends it, with the
    duration the heartbeat measured (how late it ran, plus half a beat: the stall began
    between two beats)."""
    obs = make_observed(block_threshold=0.1)
    run = _run_for(obs)
    probe = _probe(fake_clock, obs, run=run)
    due = probe.due
    fake_clock.now = due + 0.05
    assert probe.check() == pytest.approx(0.05)  # sleeps until the threshold would pass
    assert obs.logs.named("task.loop_blocked") == []
    fake_clock.now = due + 0.12
    probe.check()
    probe.check()  # the same stall: no second report
    fake_clock.now = due + 0.3
    _heartbeat_returns(probe, fake_clock)
    probe.check()
    (event,) = obs.logs.named("task.loop_blocked")
    assert (event["task"], event["ongoing"]) == ("tests.fake.task", True)
    assert event["duration_s"] == pytest.approx(0.12)
    (ended,) = obs.logs.named("task.loop_unblocked")
    assert ended["duration_s"] == pytest.approx(0.3 + HALF_BEAT)
    assert ended["location"] == event["location"]
    assert obs.value("taskscope_task_loop_blocks_total", task="tests.fake.task") == 1.0
    assert obs.value("taskscope_task_loop_block_seconds_sum", task="tests.fake.task") == (
        pytest.approx(0.3 + HALF_BEAT)
    )
    assert run.blocks == 1
    assert run.stalls is not None
    assert [s.duration for s in run.stalls] == [pytest.approx(0.3 + HALF_BEAT)]
    assert probe.stall is None
    fake_clock.now += 0.01
    probe.check()  # the loop is fine: nothing new
    assert len(obs.logs.named("task.loop_blocked")) == 1


def test_a_stall_outside_background_tasks_is_reported_as_such(fake_clock: FakeClock) -> None:
    """No background task's code ran (an endpoint, a callback): blamed on no task."""
    obs = make_observed(block_threshold=0.1)
    innocent = _run_for(obs, "tests.fake.innocent")  # in flight, suspended
    probe = _probe(fake_clock, obs, run=None)
    fake_clock.now = probe.due + 0.11
    probe.check()
    (event,) = obs.logs.named("task.loop_blocked")
    assert event["task"] == OUTSIDE
    assert obs.value("taskscope_task_loop_blocks_total", task=OUTSIDE) == 1.0
    assert innocent.blocks == 0


def test_each_runtime_past_its_own_threshold(fake_clock: FakeClock) -> None:
    """Two Telemetry objects on one loop: the smallest threshold detects; a task's stall
    goes to its own Telemetry only, past that Telemetry's threshold."""
    quick, slow = make_observed(block_threshold=0.1), make_observed(block_threshold=0.5)
    run = _run_for(slow)
    probe = _probe(fake_clock, quick, slow, run=run)
    due = probe.due
    fake_clock.now = due + 0.2
    assert probe.check() == pytest.approx(0.05)  # during a stall: half the threshold
    assert slow.logs.named("task.loop_blocked") == []
    fake_clock.now = due + 0.49
    assert probe.check() == pytest.approx(0.01)  # wakes when the larger threshold passes
    fake_clock.now = due + 0.51
    probe.check()
    assert [e["task"] for e in slow.logs.named("task.loop_blocked")] == ["tests.fake.task"]
    fake_clock.now = due + 0.6
    _heartbeat_returns(probe, fake_clock)
    probe.check()
    ended = slow.logs.named("task.loop_unblocked")
    assert [e["duration_s"] for e in ended] == [pytest.approx(0.6 + HALF_BEAT)]
    assert run.blocks == 1
    assert quick.logs.named("task.loop_blocked") == []  # another Telemetry's task
    assert quick.logs.named("task.loop_unblocked") == []


def test_a_stall_outside_tasks_goes_to_every_runtime(fake_clock: FakeClock) -> None:
    """No task to blame: each Telemetry on the loop is told, past its own threshold."""
    quick, slow = make_observed(block_threshold=0.1), make_observed(block_threshold=0.5)
    probe = _probe(fake_clock, quick, slow, run=None)
    due = probe.due
    fake_clock.now = due + 0.2
    probe.check()
    assert [e["task"] for e in quick.logs.named("task.loop_blocked")] == [OUTSIDE]
    assert slow.logs.named("task.loop_blocked") == []
    fake_clock.now = due + 0.3
    _heartbeat_returns(probe, fake_clock)
    probe.check()
    assert [e["duration_s"] for e in quick.logs.named("task.loop_unblocked")] == [
        pytest.approx(0.3 + HALF_BEAT)
    ]
    assert slow.logs.named("task.loop_blocked") == []  # shorter than its threshold


def test_a_stall_shorter_than_the_threshold_is_not_reported(fake_clock: FakeClock) -> None:
    obs = make_observed(block_threshold=0.1)
    probe = _probe(fake_clock, obs, run=_run_for(obs))
    fake_clock.now = probe.due + 0.09
    probe.check()
    _heartbeat_returns(probe, fake_clock)
    probe.check()
    assert obs.logs.named("task.loop_blocked") == []


def test_busy_time_is_sampled(fake_clock: FakeClock) -> None:
    """Each look credits the time since the previous one to the task found running."""
    obs = make_observed(block_threshold=0.1)
    run = _run_for(obs)
    probe = _probe(fake_clock, obs, run=run)
    probe._last_sample = fake_clock.now
    for _ in range(5):
        fake_clock.now += 0.02
        _heartbeat_returns(probe, fake_clock)  # a busy loop, never stalled
        probe.check()
    assert run.busy == pytest.approx(0.1)
    probe._blamer = FakeBlamer(None)  # type: ignore[assignment]
    fake_clock.now += 0.02
    probe.check()
    assert run.busy == pytest.approx(0.1)


def test_settle_ends_the_stall_from_the_loop_thread(fake_clock: FakeClock) -> None:
    """settle(): the loop runs again, so the open stall ends now, once."""
    obs = make_observed(block_threshold=0.1)
    probe = _probe(fake_clock, obs, run=_run_for(obs))
    fake_clock.now = probe.due + 0.15
    probe.check()
    stall = probe.stall
    assert stall is not None
    fake_clock.now += 0.05
    probe.end_stall(stall, fake_clock.now)
    probe.check()  # still no heartbeat: not a second stall
    _heartbeat_returns(probe, fake_clock)
    probe.check()
    assert len(obs.logs.named("task.loop_blocked")) == 1
    (ended,) = obs.logs.named("task.loop_unblocked")
    assert ended["duration_s"] == pytest.approx(0.2 + HALF_BEAT)


def test_context_of_reads_the_task_context_from_another_thread() -> None:
    """The run in a task's context, read from another thread (the C task on 3.11 has no
    get_context(): its first referenced Context), not a done callback's context."""
    from taskscope._stepping import context_of, current_run

    obs = make_observed()
    run = _run_for(obs)
    seen: list[Any] = []
    ready, release = threading.Event(), threading.Event()

    async def child() -> None:
        ready.set()
        release.wait(5)  # holds the loop while the other thread looks

    async def main() -> None:
        current_run.set(run)
        loop = asyncio.get_running_loop()

        def look() -> None:
            ready.wait(5)
            task = asyncio.current_task(loop)
            context = context_of(task)
            seen.append(None if context is None else context.get(current_run))
            release.set()

        thread = threading.Thread(target=look)
        thread.start()
        task = asyncio.ensure_future(child())
        task.add_done_callback(lambda _: None, context=contextvars.Context())
        await task
        thread.join()

    asyncio.run(main())
    assert seen == [run]


def test_an_idle_loop_is_not_blamed() -> None:
    """A loop waiting in its selector (its heartbeat late only because its thread was
    not scheduled) has nothing to blame; a blocking callback is outside tasks, at its line."""
    from taskscope._stepping import Blamer

    loop = asyncio.new_event_loop()
    started = threading.Event()

    def serve() -> None:
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        started.wait(5)
        time.sleep(0.05)
        assert thread.ident is not None
        blamer = Blamer("asyncio", thread.ident, loop, None)
        assert blamer.blame() is None  # waiting in select
        loop.call_soon_threadsafe(blocking.outside, 0.3)
        time.sleep(0.1)
        blamed = blamer.blame()
        assert blamed is not None
        run, frames = blamed
        assert run is None
        assert frames[-1].f_code.co_name == "outside"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    stopped = Blamer("asyncio", threading.get_ident(), loop, None)
    assert stopped.blame() is None  # closed (not running)
