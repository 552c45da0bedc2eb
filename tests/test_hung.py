"""Hung tasks: reported past ``hung_after`` with where they wait, then at a back-off.

The task ages come from a fake clock (the Telemetry's); the watchdog thread that scans
them runs in real time, so the tests wait (polling, at most a few seconds) for its report
or for a number of its scans. The tasks really wait on what they wait on; the test lets
them go. Ground truth for the lines: ``# BLOCK: hung-...`` markers in the scenario module.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import pytest
import uvloop
from prometheus_client import CollectorRegistry

from taskscope import BackgroundTasks, Telemetry, _hung
from taskscope._probe import _probes, probe_for
from taskscope._run import TaskRun
from taskscope._runtime import runtime_of
from tests.conftest import Observed, make_observed
from tests.scenarios import hanging, markers

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("both_record_paths")]


@pytest.fixture(params=["asyncio", "trio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """asyncio, trio, and asyncio on uvloop's loop."""
    if request.param == "uvloop":
        return ("asyncio", {"loop_factory": uvloop.new_event_loop})
    return request.param


def backend_name(anyio_backend: Any) -> str:
    return anyio_backend if isinstance(anyio_backend, str) else anyio_backend[0]


HUNG = 1.0  # seconds of fake time; the watchdog scans every HUNG / 20 s of real time
FILE = os.path.realpath(hanging.__file__)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def observed(clock: Callable[[], float], **options: Any) -> Observed:
    options.setdefault("hung_after", HUNG)
    return make_observed(clock=clock, **options)


def name_of(func: Callable[..., Any]) -> str:
    return f"{func.__module__}.{func.__qualname__}"


async def until(predicate: Callable[[], Any]) -> Any:
    """Poll ``predicate`` (real time) until it is truthy; fail after 5 s."""
    deadline = time.perf_counter() + 5.0
    while not (found := predicate()):
        assert time.perf_counter() < deadline, "timed out"
        await anyio.sleep(0.005)
    return found


async def entered(flag: threading.Event) -> None:
    await until(flag.is_set)
    await anyio.sleep(0.01)  # from the flag to the marked wait (a thread: real time)


def hung(obs: Observed) -> list[dict[str, Any]]:
    return obs.logs.named("task.hung")


async def run(obs: Observed, func: Callable[..., Any], *args: Any) -> None:
    tasks = BackgroundTasks(telemetry=obs.telemetry)
    tasks.add_task(func, *args)
    await tasks()


def scans() -> int:
    return sum(probe.scans for probe in list(_probes.values()))


async def two_scans() -> None:
    """Wait until the watchdog has scanned twice more (so once after this call)."""
    seen = scans()
    await until(lambda: scans() >= seen + 2)


def assert_reported(
    obs: Observed, func: Callable[..., Any], marker: str, *, sync: bool
) -> dict[str, Any]:
    """One ``task.hung`` for ``func`` at ``marker``, in the log and on the task's span."""
    (event,) = hung(obs)
    assert event["task"] == name_of(func)
    assert event["location"] in markers(FILE, marker), (event["location"], event["stack"])
    assert event["sync"] is sync
    assert event["report"] == 1
    assert event["age_s"] >= HUNG
    assert event["trace_id"] is not None
    assert event["span_id"] is not None
    lines = [line.strip() for line in event["stack"].splitlines()]
    assert any(line.startswith(event["location"] + " in ") for line in lines), lines
    return event


def assert_span_and_record(obs: Observed, func: Callable[..., Any], event: dict[str, Any]) -> None:
    (span,) = [s for s in obs.task_spans() if s.name == f"background_task {name_of(func)}"]
    (span_event,) = [e for e in span.events if e.name == "task.hung"]
    assert span_event.attributes is not None
    assert "code.location" not in span_event.attributes  # the older convention
    path, _, line = event["location"].rpartition(":")
    assert span_event.attributes["code.file.path"] == path
    assert span_event.attributes["code.line.number"] == int(line)
    (ended,) = obs.logs.named("task.hung_ended")
    assert ended["task"] == name_of(func)
    assert ended["hung_reported"] is True


async def test_a_future_that_never_completes(anyio_backend: Any) -> None:
    """A task awaiting a future nobody completes is reported at its ``await``."""
    clock = FakeClock()
    obs = observed(clock)
    flag = threading.Event()
    release = anyio.Event()
    func: Callable[..., Any]
    args: tuple[Any, ...]
    if backend_name(anyio_backend) == "asyncio":
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        func, args, marker = hanging.awaits_future, (future, flag), "hung-future"
    else:
        func, args, marker = hanging.awaits_event, (release, flag), "hung-event"
    async with anyio.create_task_group() as group:
        group.start_soon(run, obs, func, *args)
        await entered(flag)
        clock.now += HUNG
        await until(lambda: hung(obs))
        if backend_name(anyio_backend) == "asyncio":
            future.set_result(None)
        release.set()
    event = assert_reported(obs, func, marker, sync=False)
    assert_span_and_record(obs, func, event)


async def test_a_slow_loopback_server(anyio_backend: Any) -> None:
    """A task reading from a server that does not answer is reported at its read."""
    clock = FakeClock()
    obs = observed(clock)
    flag = threading.Event()
    answer = anyio.Event()

    async def serve(stream: Any) -> None:
        async with stream:
            await answer.wait()
            await stream.send(b"late")

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as group:
        group.start_soon(listener.serve, serve)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(run, obs, hanging.reads_slow_server, port, flag)
            await entered(flag)
            clock.now += HUNG * 1.5
            await until(lambda: hung(obs))
            answer.set()
        group.cancel_scope.cancel()
    event = assert_reported(obs, hanging.reads_slow_server, "hung-server", sync=False)
    assert event["age_s"] == pytest.approx(HUNG * 1.5)
    assert_span_and_record(obs, hanging.reads_slow_server, event)
    assert (
        obs.value(
            "taskscope_tasks_total", task=name_of(hanging.reads_slow_server), outcome="success"
        )
        == 1
    )


@pytest.mark.parametrize(
    "anyio_backend", ["asyncio", ("asyncio", {"loop_factory": uvloop.new_event_loop})]
)
async def test_a_gathered_child_that_hangs(anyio_backend: Any) -> None:
    """asyncio.gather: the location is the pending child's await; the stack shows both."""
    clock = FakeClock()
    obs = observed(clock)
    flag = threading.Event()
    release = anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(run, obs, hanging.gathers, release, flag)
        await entered(flag)
        clock.now += HUNG
        await until(lambda: hung(obs))
        release.set()
    event = assert_reported(obs, hanging.gathers, "hung-child", sync=False)
    lines = event["stack"].splitlines()
    assert lines[0].startswith("child ")
    (child_line,) = [line for line in lines if line.strip().startswith(event["location"] + " ")]
    assert child_line.startswith("  ")
    gather_line = next(iter(markers(FILE, "hung-gather")))
    assert any(line.startswith(gather_line + " in gathers") for line in lines), lines
    assert len([line for line in lines if line.startswith("child ")]) == 1  # _quick is done


async def test_a_task_group_child_that_hangs(anyio_backend: Any) -> None:
    """anyio task group (asyncio TaskGroup-like, trio nursery): the pending child is found."""
    clock = FakeClock()
    obs = observed(clock)
    flag = threading.Event()
    release = anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(run, obs, hanging.task_group, release, flag)
        await entered(flag)
        clock.now += HUNG
        await until(lambda: hung(obs))
        release.set()
    event = assert_reported(obs, hanging.task_group, "hung-child", sync=False)
    assert "task_group" in event["stack"]


@pytest.mark.parametrize(
    ("anyio_backend", "func"),
    [("asyncio", hanging.asyncio_task_group), ("trio", hanging.trio_nursery)],
)
async def test_native_task_group_and_nursery(anyio_backend: Any, func: Any) -> None:
    """asyncio.TaskGroup and trio's nursery: the pending child's line, under its parent."""
    clock = FakeClock()
    obs = observed(clock)
    flag = threading.Event()
    release = anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(run, obs, func, release, flag)
        await entered(flag)
        clock.now += HUNG
        await until(lambda: hung(obs))
        release.set()
    event = assert_reported(obs, func, "hung-child", sync=False)
    lines = event["stack"].splitlines()
    assert lines[0].startswith("child ")
    assert lines[-1].endswith(f" in {func.__name__}")
    assert not any("_quick" in line for line in lines)  # done: not a pending child


async def test_a_sync_task_in_time_sleep(anyio_backend: Any) -> None:
    """A sync task stuck in its worker thread is reported with that thread's stack."""
    clock = FakeClock()
    obs = observed(clock)
    flag, release = threading.Event(), threading.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(run, obs, hanging.sleeps, release, flag)
        await entered(flag)
        clock.now += HUNG
        await until(lambda: hung(obs))
        release.set()
    event = assert_reported(obs, hanging.sleeps, "hung-sleep", sync=True)
    assert "in_worker_thread" not in event["stack"]  # taskscope's and the pool's frames cut
    assert_span_and_record(obs, hanging.sleeps, event)


async def test_a_sync_task_blocked_on_a_lock(anyio_backend: Any) -> None:
    """A sync task waiting for a threading.Lock is reported at the acquire."""
    clock = FakeClock()
    obs = observed(clock)
    flag, lock = threading.Event(), threading.Lock()
    lock.acquire()
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(run, obs, hanging.takes_lock, lock, flag)
            await entered(flag)
            clock.now += HUNG
            await until(lambda: hung(obs))
            lock.release()
    finally:
        if lock.locked():
            lock.release()
    event = assert_reported(obs, hanging.takes_lock, "hung-lock", sync=True)
    assert event["stack"].splitlines() == [f"{event['location']} in takes_lock"]


async def test_ending_just_under_the_threshold_is_never_reported(anyio_backend: Any) -> None:
    """A task that ends a hair before hung_after: no event, and its record says so."""
    clock = FakeClock()
    obs = observed(clock)
    flag = threading.Event()
    release = anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(run, obs, hanging.awaits_event, release, flag)
        await entered(flag)
        clock.now += HUNG - 1e-6
        await two_scans()  # the watchdog looked, more than once
        release.set()
    assert hung(obs) == []
    assert obs.logs.named("task.hung_ended") == []
    (span,) = obs.task_spans()
    assert [e.name for e in span.events] == []


async def test_a_hung_task_that_fails_says_so(anyio_backend: Any) -> None:
    """task.failed carries hung_reported (no separate hung_ended event for failures)."""
    clock = FakeClock()
    obs = observed(clock)
    flag = threading.Event()
    release = anyio.Event()

    async def run_failing() -> None:
        with pytest.raises(ConnectionError, match="upstream gave up"):
            await run(obs, hanging.fails_after, release, flag)

    async with anyio.create_task_group() as group:
        group.start_soon(run_failing)
        await entered(flag)
        clock.now += HUNG
        await until(lambda: hung(obs))
        release.set()
    assert_reported(obs, hanging.fails_after, "hung-then-fails", sync=False)
    (failed,) = obs.logs.named("task.failed")
    assert failed["hung_reported"] is True
    assert obs.logs.named("task.hung_ended") == []


def test_abandoned_at_exit_keeps_the_mark() -> None:
    """A hung task still running at interpreter exit: abandoned, and marked as reported."""
    from taskscope.testing import capture

    obs = make_observed(clock=FakeClock())
    runtime = runtime_of(obs.telemetry)
    with capture(obs.telemetry) as captured:
        run = TaskRun("app.stuck", runtime)
        run.hung = 2
        runtime.track(1, "app.stuck", 990.0, run)
        runtime.track(2, "app.waiting", None)  # accounted for, never started
        assert runtime.abandon_inflight() == {"app.stuck": 1, "app.waiting": 1}
    by_name = {r.name: r for r in captured.tasks}
    assert by_name["app.stuck"].hung_reported
    assert by_name["app.stuck"].duration == 10.0
    assert not by_name["app.waiting"].hung_reported
    assert by_name["app.waiting"].duration == 0.0


def test_through_a_fastapi_app() -> None:
    """FastAPI route, drop-in BackgroundTasks: the hung task is reported while the request's
    tasks still run, on the task's span; the client gets its answer when it ends."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from taskscope import instrument_app

    clock = FakeClock()
    obs = observed(clock)
    flag, release = threading.Event(), threading.Event()
    app = FastAPI()

    @app.post("/orders")
    async def order(background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(hanging.waits_for_a_flag, release, flag)
        return {"ok": "yes"}

    instrument_app(app, obs.telemetry)
    answers: list[int] = []
    with TestClient(app) as client:
        thread = threading.Thread(target=lambda: answers.append(client.post("/orders").status_code))
        thread.start()
        try:
            assert flag.wait(5)
            clock.now += HUNG
            deadline = time.perf_counter() + 5
            while not hung(obs) and time.perf_counter() < deadline:
                time.sleep(0.005)  # the test's thread, not the app's loop
        finally:
            release.set()
            thread.join(5)
    assert answers == [200]
    event = assert_reported(obs, hanging.waits_for_a_flag, "hung-flag", sync=False)
    assert_span_and_record(obs, hanging.waits_for_a_flag, event)


def test_back_off_is_bounded() -> None:
    """Reported at the threshold, then at doubling ages, at most MAX_GAP apart."""
    ages = [_hung.due_age(60.0, step) for step in range(8)]
    assert ages[:5] == [60.0, 120.0, 240.0, 480.0, 960.0]
    gaps = [b - a for a, b in itertools.pairwise(ages)]
    assert max(gaps) == _hung.MAX_GAP
    assert ages[7] == 960.0 + 600.0 * 3


async def test_reported_again_at_the_back_off_then_recorded(anyio_backend: Any) -> None:
    """One report per due age, not one per scan; the final record says it was reported."""
    from taskscope.testing import capture

    clock = FakeClock()
    obs = observed(clock)
    flag = threading.Event()
    release = anyio.Event()
    with capture(obs.telemetry) as captured:
        async with anyio.create_task_group() as group:
            group.start_soon(run, obs, hanging.awaits_event, release, flag)
            await entered(flag)
            for age, reports in ((HUNG, 1), (HUNG * 1.9, 1), (HUNG * 2, 2), (HUNG * 4.5, 3)):
                clock.now = 1000.0 + age
                await two_scans()
                assert len(hung(obs)) == reports, (age, hung(obs))
            release.set()
    assert [e["report"] for e in hung(obs)] == [1, 2, 3]
    assert [h.report for h in captured.hung] == [1, 2, 3]
    (record,) = captured.tasks
    assert record.hung_reported
    assert record.outcome == "success"


async def test_off_with_none(anyio_backend: Any) -> None:
    """hung_after=None: no scans, no report, however long the task runs."""
    clock = FakeClock()
    obs = observed(clock, hung_after=None)
    flag = threading.Event()
    release = anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(run, obs, hanging.awaits_event, release, flag)
        await entered(flag)
        clock.now += 10**6
        probe = probe_for(runtime_of(obs.telemetry))
        assert probe is not None
        assert probe.hung_period is None
        await anyio.sleep(0.05)  # what a scan would take: none is scheduled
        release.set()
    assert hung(obs) == []


async def test_detection_latency_in_real_time(anyio_backend: Any) -> None:
    """Real clock: the report comes within one scan period (+ slack) of the threshold."""
    obs = make_observed(hung_after=0.2)
    flag = threading.Event()
    release = anyio.Event()
    started: list[float] = []
    arrived: list[float] = []
    log = obs.logs._log

    def timed(level: str, event: str, **kw: Any) -> None:
        if event == "task.hung":
            arrived.append(time.perf_counter())
        log(level, event, **kw)

    obs.logs._log = timed  # type: ignore[method-assign]

    async with anyio.create_task_group() as group:
        started.append(time.perf_counter())  # before taskscope's start: an upper bound
        group.start_soon(run, obs, hanging.awaits_event, release, flag)
        await until(lambda: arrived)
        release.set()
    latency = arrived[0] - started[0] - 0.2
    print(f"hung detection latency past the threshold: {latency * 1000:.1f} ms")
    assert 0.0 <= latency < _hung.scan_period(0.2) + 0.25, latency  # slack: a shared CPU


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("factory", ["Task", "_PyTask"])
async def test_a_task_awaited_directly(anyio_backend: Any, factory: str) -> None:
    """``await task``: through the C FutureIter or the pure-Python Future.__await__."""
    import asyncio.tasks

    make = getattr(asyncio.tasks, factory)
    runtime = runtime_of(Telemetry(prometheus=False, otel_metrics=False, loop_probe=False))
    run = TaskRun("t", runtime)
    flag = threading.Event()
    release = anyio.Event()
    run.coro = coro = hanging.awaits_a_task(release, flag, make)
    parent = asyncio.get_running_loop().create_task(coro)
    await entered(flag)
    location, stack = _hung.where(run)
    release.set()
    await parent
    assert location in markers(FILE, "hung-child")
    assert stack[0].startswith("child ")
    assert stack[-1].startswith(next(iter(markers(FILE, "hung-awaits-task"))) + " in ")


def test_a_sync_task_waiting_for_a_thread() -> None:
    """Not started in a thread yet, or already back from it: said so, never another
    task's stack."""
    runtime = runtime_of(Telemetry(prometheus=False, otel_metrics=False))
    run = TaskRun("t", runtime)
    assert _hung.where(run) == (_hung.WAITING_FOR_THREAD, ())
    run.thread = 0  # its function returned; the loop has not resumed the task yet
    assert _hung.where(run) == (_hung.LEFT_THREAD, ())


def test_hung_after_setting_and_env() -> None:
    """hung_after: positive seconds or None; TASKSCOPE_HUNG_AFTER reads seconds or off."""
    assert Telemetry().hung_after == 60.0
    assert Telemetry.from_env({"TASKSCOPE_HUNG_AFTER": "90"}).hung_after == 90.0
    assert Telemetry.from_env({"TASKSCOPE_HUNG_AFTER": "off"}).hung_after is None
    assert Telemetry.from_env({"TASKSCOPE_HUNG_AFTER": " None "}).hung_after is None
    with pytest.raises(ValueError, match="TASKSCOPE_HUNG_AFTER"):
        Telemetry.from_env({"TASKSCOPE_HUNG_AFTER": "soon"})
    with pytest.raises(ValueError, match="hung_after"):
        Telemetry(hung_after=0)
    with pytest.raises(ValueError, match="hung_after"):
        Telemetry(hung_after=-1.0)


def otel_oldest(obs: Observed) -> dict[str, float]:
    data = obs.metric_reader.get_metrics_data()
    assert data is not None
    return {
        str(point.attributes["task"]): point.value  # type: ignore[union-attr]
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "taskscope.task.oldest_running"
        for point in metric.data.data_points
        if point.attributes is not None
    }


async def test_oldest_running_gauge(anyio_backend: Any) -> None:
    """Age of the oldest running task per name, at scrape time (Prometheus and OTel)."""
    clock = FakeClock()
    obs = observed(clock, hung_after=None)
    name = name_of(hanging.awaits_event)
    flags = [threading.Event(), threading.Event()]
    release = anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(run, obs, hanging.awaits_event, release, flags[0])
        await entered(flags[0])
        clock.now += 30.0
        group.start_soon(run, obs, hanging.awaits_event, release, flags[1])
        await entered(flags[1])
        clock.now += 12.5
        assert obs.value("taskscope_task_oldest_running_seconds", task=name) == 42.5
        if obs.telemetry.otel_metrics:  # not on the batched record path
            assert otel_oldest(obs) == {name: 42.5}
        release.set()
    assert (
        obs.registry.get_sample_value("taskscope_task_oldest_running_seconds", {"task": name})
        == 0.0
    )
    if obs.telemetry.otel_metrics:
        assert otel_oldest(obs) == {name: 0.0}


def test_oldest_running_gauge_multiprocess_values() -> None:
    """prometheus_client's gauge (multiprocess mode) is written by the watchdog's scan."""
    from taskscope._signals.prometheus import PrometheusMetrics

    class Source:
        def __init__(self) -> None:
            self.ages = {"a": 3.0, "b": 90.0}

        def oldest_running(self) -> dict[str, float]:
            return self.ages

    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    source = Source()
    metrics.watch(source)
    metrics.task_started("a")
    metrics.task_started("c")
    metrics.refresh_oldest()
    value = registry.get_sample_value
    assert value("taskscope_task_oldest_running_seconds", {"task": "a"}) == 3.0
    assert value("taskscope_task_oldest_running_seconds", {"task": "b"}) == 90.0
    assert value("taskscope_task_oldest_running_seconds", {"task": "c"}) == 0.0
    source.ages = {}
    metrics.refresh_oldest()
    assert value("taskscope_task_oldest_running_seconds", {"task": "a"}) == 0.0


async def test_oldest_running_gauge_written_by_the_scan_in_multiprocess_mode(
    anyio_backend: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """prometheus_client's objects (multiprocess mode): the watchdog's scan writes the gauge."""
    from taskscope._signals.prometheus import PrometheusMetrics

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    clock = FakeClock()
    obs = observed(clock, hung_after=2.0)  # not reached: the gauge alone
    assert isinstance(runtime_of(obs.telemetry).prometheus, PrometheusMetrics)
    name = name_of(hanging.awaits_event)
    flag = threading.Event()
    release = anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(run, obs, hanging.awaits_event, release, flag)
        await entered(flag)
        clock.now += 1.5
        await two_scans()
        assert obs.value("taskscope_task_oldest_running_seconds", task=name) == 1.5
        release.set()
    await two_scans()
    assert (
        obs.registry.get_sample_value("taskscope_task_oldest_running_seconds", {"task": name})
        == 0.0
    )
    assert hung(obs) == []


async def test_a_failing_clock_costs_neither_the_scrape_nor_the_task(anyio_backend: Any) -> None:
    """The gauge and the check read the Telemetry's clock off the hot path: if it raises,
    the scrape still renders and the error is counted, not raised."""
    clock = FakeClock()
    broken = threading.Event()

    def flaky() -> float:
        if broken.is_set():
            raise RuntimeError("clock")
        return clock()

    obs = observed(flaky)
    flag = threading.Event()
    release = anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(run, obs, hanging.awaits_event, release, flag)
        await entered(flag)
        broken.set()
        await two_scans()
        obs.registry.collect()  # renders; the gauge is 0 (unknown age)
        assert (
            obs.value("taskscope_task_oldest_running_seconds", task=name_of(hanging.awaits_event))
            == 0.0
        )
        otel = obs.telemetry.otel_metrics  # off on the batched record path
        if otel:
            assert obs.metric_reader.get_metrics_data() is not None
        broken.clear()
        release.set()
    errors = {
        signal: obs.value("taskscope_instrumentation_errors_total", signal=signal)
        for signal in ("prometheus", "otel_metrics", "loop_probe")
    }
    assert errors["loop_probe"] >= 1, errors  # the watchdog's check
    if otel:
        assert errors["otel_metrics"] >= 1, errors  # the observable gauge's callback
    assert runtime_of(obs.telemetry).absorbed_errors >= (3 if otel else 2)
    assert obs.outcomes() == {(name_of(hanging.awaits_event), "success"): 1.0}


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_taskiq_task_in_a_worker(anyio_backend: Any) -> None:
    """taskiq (in-memory broker, the worker's loop): reported at the task's own await,
    through the receiver's frames; its record says so."""
    from taskiq import InMemoryBroker

    from taskscope import start_loop_probe
    from taskscope.taskiq import TaskscopeMiddleware
    from taskscope.testing import capture

    clock = FakeClock()
    obs = observed(clock)
    broker = InMemoryBroker().with_middlewares(TaskscopeMiddleware(obs.telemetry))
    task = broker.task(task_name="tests.scenarios.hanging:queued_waits")(hanging.queued_waits)
    flag = threading.Event()
    release = asyncio.Event()
    hanging.queue_waits_on.update(entered=flag, release=release)
    await broker.startup()
    await start_loop_probe(obs.telemetry)
    try:
        with capture(obs.telemetry) as captured:
            await task.kiq()
            await entered(flag)
            clock.now += HUNG
            await until(lambda: hung(obs))
            release.set()
            await until(lambda: captured.tasks)
    finally:
        await broker.shutdown()
        hanging.queue_waits_on.clear()
    (event,) = hung(obs)
    assert event["task"] == "tests.scenarios.hanging.queued_waits"
    assert event["location"] in markers(FILE, "hung-queued"), event["stack"]
    (record,) = captured.tasks
    assert record.hung_reported
    assert record.outcome == "success"
