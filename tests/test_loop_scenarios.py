"""The loop probe against real blocking code: which task, which line, how long.

Each scenario runs real background tasks (``taskscope.BackgroundTasks(...)()`` awaited in an
anyio test, asyncio and trio) that really block the loop: blocking the loop is the behaviour
under test, so these sleeps are real (each at most 0.3 s). Ground truth comes from the
scenario modules: the task's name, and its blocking line found by a ``# BLOCK: name`` marker.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.to_thread
import pytest
import uvloop

import taskscope
from taskscope import BackgroundTasks
from tests.conftest import LogRecorder, Observed, make_observed
from tests.scenarios import blocking, markers, quiet

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("both_record_paths")]
THRESHOLD = 0.1
BLOCKING_FILE = os.path.realpath(blocking.__file__)


class TimingRecorder(LogRecorder):
    """Notes when each event arrived (``at``, perf_counter) and on which thread."""

    def _log(self, level: str, event: str, **kw: Any) -> None:
        kw["at"] = time.perf_counter()
        kw["thread"] = threading.get_ident()
        super()._log(level, event, **kw)


def observed() -> Observed:
    obs = make_observed(block_threshold=THRESHOLD)
    obs.logs.__class__ = TimingRecorder
    return obs


def name_of(func: Callable[..., Any]) -> str:
    return f"{func.__module__}.{func.__qualname__}"


async def run(obs: Observed, *tasks: tuple[Callable[..., Any], tuple[Any, ...]]) -> None:
    background = BackgroundTasks(telemetry=obs.telemetry)
    for func, args in tasks:
        background.add_task(func, *args)
    await background()
    await settled(obs)


async def settled(obs: Observed) -> None:
    """Wait until every stall reported ongoing has ended: the end is recorded when the
    loop's heartbeat comes back (a beat after the loop is free), not when the task ends."""
    for _ in range(100):
        ongoing = [e for e in blocked(obs) if e["ongoing"]]
        if len(obs.logs.named("task.loop_unblocked")) >= len(ongoing):
            return
        await anyio.sleep(0.01)


def blocked(obs: Observed) -> list[dict[str, Any]]:
    return obs.logs.named("task.loop_blocked")


def assert_one_block(
    obs: Observed, task: Callable[..., Any], where: set[str], *, duration: float = 0.25
) -> dict[str, Any]:
    """Exactly one block, attributed to ``task`` at one of ``where``, in every signal."""
    name = name_of(task)
    events = blocked(obs)
    assert len(events) == 1, events
    event = events[0]
    assert event["task"] == name
    assert event["location"] in where, (event["location"], where, event["stack"])
    assert obs.value("taskscope_task_loop_blocks_total", task=name) == 1.0
    assert obs.value("taskscope_task_loop_block_seconds_count", task=name) == 1.0
    assert obs.value("taskscope_task_loop_block_seconds_sum", task=name) >= duration
    (span,) = [s for s in obs.task_spans() if s.name == f"background_task {name}"]
    (span_event,) = [e for e in span.events if e.name == "loop.blocked"]
    assert span_event.attributes is not None
    path, _, line = str(event["location"]).rpartition(":")
    assert span_event.attributes["code.file.path"] == path
    assert span_event.attributes["code.line.number"] == int(line)
    assert "code.location" not in span_event.attributes  # the older convention
    assert float(str(span_event.attributes["taskscope.block.duration"])) >= duration
    return event


# -- blocking calls that release the GIL: the watchdog samples the blocking line ----------------
async def test_time_sleep_in_async_def(anyio_backend: str) -> None:
    """time.sleep in an async task: reported during the block, at the sleep line."""
    obs = observed()
    await run(obs, (blocking.sleeps, ()))
    event = assert_one_block(obs, blocking.sleeps, markers(BLOCKING_FILE, "sleep"))
    assert event["ongoing"] is True
    assert event["sampled"] is True
    assert event["thread"] != threading.get_ident()  # from the watchdog thread


async def test_detected_while_the_block_still_runs(anyio_backend: str) -> None:
    """A 300 ms block at a 100 ms threshold is reported at most 150 ms after it starts."""
    obs = observed()
    await run(obs, (blocking.sleeps, ()))
    started = blocking.timestamps["sleeps"]
    (event,) = blocked(obs)
    assert event["ongoing"] is True
    latency = event["at"] - started
    assert THRESHOLD <= latency <= 0.15, latency
    assert event["at"] < started + blocking.BLOCK  # while the loop was still blocked


async def test_cpu_loop(anyio_backend: str) -> None:
    """A pure-Python busy loop (GIL held between switch intervals) is sampled in the loop."""
    obs = observed()
    await run(obs, (blocking.cpu_loop, ()))
    event = assert_one_block(obs, blocking.cpu_loop, markers(BLOCKING_FILE, "cpu"))
    assert event["ongoing"] is True


async def test_blocking_fifo_read(anyio_backend: str) -> None:
    """Opening and reading a FIFO whose writer is late blocks at the open line."""
    obs = observed()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fifo")
        os.mkfifo(path)

        def writer() -> None:
            time.sleep(blocking.BLOCK)
            with open(path, "wb") as fifo:
                fifo.write(b"hello")

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            await run(obs, (blocking.reads_fifo, (path,)))
        finally:
            thread.join()
    # The writer's delay counts from its thread's start, before the task runs: on a loaded
    # machine the task blocks for less than BLOCK.
    assert_one_block(obs, blocking.reads_fifo, markers(BLOCKING_FILE, "fifo"), duration=0.2)


@contextmanager
def slow_server(delay: float) -> Iterator[int]:
    """A 127.0.0.1 server thread that answers each connection after ``delay`` seconds."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            time.sleep(delay)
            conn.sendall(b"pong")

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield port
    finally:
        thread.join(timeout=5)
        server.close()


async def test_blocking_socket_recv(anyio_backend: str) -> None:
    """A blocking recv from a slow local server is blamed on the recv line."""
    obs = observed()
    with slow_server(blocking.BLOCK) as port:
        await run(obs, (blocking.receives, (port,)))
    assert_one_block(obs, blocking.receives, markers(BLOCKING_FILE, "recv"))


async def test_lock_held_by_another_thread(anyio_backend: str) -> None:
    """Waiting for a threading.Lock another thread holds is blamed on the with line."""
    obs = observed()
    lock = threading.Lock()
    held = threading.Event()

    def holder() -> None:
        with lock:
            held.set()
            time.sleep(blocking.BLOCK)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait()
    try:
        await run(obs, (blocking.takes_lock, (lock,)))
    finally:
        thread.join()
    assert_one_block(obs, blocking.takes_lock, markers(BLOCKING_FILE, "lock"))


async def test_json_dumps_holding_the_gil(anyio_backend: str) -> None:
    """json.dumps of a huge object holds the GIL: the location is a line of the task's file."""
    payload = [{"a": i, "b": [1, 2, 3], "c": "x" * 10} for i in range(300_000)]
    obs = observed()
    await run(obs, (blocking.dumps, (payload,)))
    name = name_of(blocking.dumps)
    (event,) = blocked(obs)
    assert event["task"] == name
    assert event["location"], event
    assert event["location"].startswith(BLOCKING_FILE + ":")
    # Sampled right after the C call returned, or (no sample) where the step ended.
    assert event["location"] in markers(BLOCKING_FILE, "dumps") | markers(
        BLOCKING_FILE, "after-dumps"
    )
    assert obs.value("taskscope_task_loop_blocks_total", task=name) == 1.0
    assert obs.value("taskscope_task_loop_block_seconds_count", task=name) == 1.0


# -- attribution: helpers, children, the task that comes next ----------------------------------
async def test_block_in_nested_helper_coroutine(anyio_backend: str) -> None:
    """A block inside an awaited helper: the helper's line, the outer task's name."""
    obs = observed()
    await run(obs, (blocking.nested, ()))
    assert_one_block(obs, blocking.nested, markers(BLOCKING_FILE, "nested"))


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_block_in_gather_child(anyio_backend: str) -> None:
    """A block in an asyncio.gather child is the parent task's block, at the child's line."""
    obs = observed()
    await run(obs, (blocking.gathers, ()))
    assert_one_block(obs, blocking.gathers, markers(BLOCKING_FILE, "child"))


async def test_block_in_task_group_child(anyio_backend: str) -> None:
    """A block in an anyio task-group child is the parent task's block, at the child's line."""
    obs = observed()
    await run(obs, (blocking.task_group, ()))
    assert_one_block(obs, blocking.task_group, markers(BLOCKING_FILE, "child"))


async def test_block_as_last_statement_then_innocent_task(anyio_backend: str) -> None:
    """A block as a task's last statement is that task's; the next task reports nothing."""
    obs = observed()
    await run(obs, (blocking.blocks_last, ()), (blocking.innocent, ()))
    assert_one_block(obs, blocking.blocks_last, markers(BLOCKING_FILE, "last"))
    innocent = name_of(blocking.innocent)
    assert obs.value("taskscope_task_loop_blocks_total", task=innocent) == 0.0
    (span,) = [s for s in obs.task_spans() if s.name == f"background_task {innocent}"]
    assert not [e for e in span.events if e.name == "loop.blocked"]
    assert obs.outcomes()[(innocent, "success")] == 1.0


@pytest.mark.parametrize(
    "anyio_backend", ["asyncio", ("asyncio", {"loop_factory": uvloop.new_event_loop})]
)
async def test_block_in_gather_child_uvloop(anyio_backend: Any) -> None:
    """asyncio.gather children on uvloop too: the parent task's block, at the child's line."""
    obs = observed()
    await run(obs, (blocking.gathers, ()))
    assert_one_block(obs, blocking.gathers, markers(BLOCKING_FILE, "child"))


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_block_in_trio_nursery_child(anyio_backend: str) -> None:
    """A child of a trio nursery is the parent task's block, at the child's line."""
    obs = observed()
    await run(obs, (blocking.trio_nursery, ()))
    assert_one_block(obs, blocking.trio_nursery, markers(BLOCKING_FILE, "child"))


async def test_many_short_steps_in_one_iteration(anyio_backend: str) -> None:
    """20 tasks resumed together, 10 ms each: no step is long, but the loop iteration
    is 200 ms: one stall, reported while it lasts, blamed on the task running then."""
    obs = observed()
    await heartbeat_running(obs)
    name = name_of(blocking.short_step)
    async with anyio.create_task_group() as group:
        for _ in range(20):
            group.start_soon(run, obs, (blocking.short_step, ()))
    await settled(obs)
    (event,) = blocked(obs)
    assert (event["task"], event["ongoing"]) == (name, True)
    assert event["location"] in markers(BLOCKING_FILE, "short-step")
    (ended,) = obs.logs.named("task.loop_unblocked")
    assert ended["duration_s"] >= 0.15
    assert obs.value("taskscope_task_loop_blocks_total", task=name) == 1.0
    assert obs.value("taskscope_task_loop_block_seconds_sum", task=name) >= 0.15
    assert obs.value("taskscope_task_loop_blocks_total", task=taskscope.OUTSIDE_TASKS) == 0.0


async def test_stall_outside_background_tasks(anyio_backend: str) -> None:
    """Blocking code of no background task (here the test's own, as an endpoint's would
    be) while a task is in flight: reported as outside, the task is not blamed."""
    obs = observed()
    async with anyio.create_task_group() as group:
        group.start_soon(run, obs, (quiet.sleeps_async, ()))
        await anyio.sleep(0.05)  # the task is in flight, waiting
        blocking.outside()
    await settled(obs)
    (event,) = blocked(obs)
    assert event["task"] == taskscope.OUTSIDE_TASKS
    assert event["location"] in markers(BLOCKING_FILE, "outside")
    assert obs.value("taskscope_task_loop_blocks_total", task=taskscope.OUTSIDE_TASKS) == 1.0
    # Not a task: no zero series of task outcomes or warnings under that label.
    assert (
        obs.registry.get_sample_value(
            "taskscope_tasks_total", {"task": taskscope.OUTSIDE_TASKS, "outcome": "failure"}
        )
        is None
    )
    innocent = name_of(quiet.sleeps_async)
    assert obs.value("taskscope_task_loop_blocks_total", task=innocent) == 0.0
    assert obs.value("taskscope_task_loop_busy_seconds_total", task=innocent) < 0.05
    (span,) = [s for s in obs.task_spans() if s.name == f"background_task {innocent}"]
    assert not [e for e in span.events if e.name == "loop.blocked"]


async def test_stall_in_an_endpoint_while_a_task_runs(anyio_backend: str) -> None:
    """An endpoint that blocks while a background task of an earlier request is in
    flight: the stall is outside background tasks, with the endpoint's line."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    obs = observed()

    async def start(request: Request) -> Response:
        tasks = BackgroundTasks(telemetry=obs.telemetry)
        tasks.add_task(quiet.sleeps_async)
        return Response("started", background=tasks)

    async def slow(request: Request) -> Response:
        blocking.outside()
        return Response("slow")

    app = Starlette(routes=[Route("/start", start), Route("/slow", slow)])
    transport = httpx.ASGITransport(app=app)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        anyio.create_task_group() as group,
    ):
        group.start_soon(client.get, "/start")  # returns when its task has run
        await anyio.sleep(0.05)
        assert (await client.get("/slow")).text == "slow"
    await settled(obs)
    (event,) = blocked(obs)
    assert event["task"] == taskscope.OUTSIDE_TASKS
    assert event["location"] in markers(BLOCKING_FILE, "outside")
    innocent = name_of(quiet.sleeps_async)
    assert obs.outcomes()[(innocent, "success")] == 1.0
    assert obs.value("taskscope_task_loop_blocks_total", task=innocent) == 0.0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_stall_in_a_loop_callback(anyio_backend: str) -> None:
    """A plain loop callback (no task at all) that blocks: outside background tasks."""
    import asyncio

    obs = observed()
    async with anyio.create_task_group() as group:
        group.start_soon(run, obs, (quiet.sleeps_async, ()))
        await anyio.sleep(0.05)
        asyncio.get_running_loop().call_soon(blocking.outside)
    await settled(obs)
    (event,) = blocked(obs)
    assert event["task"] == taskscope.OUTSIDE_TASKS
    assert event["location"] in markers(BLOCKING_FILE, "outside")
    assert obs.value("taskscope_task_loop_blocks_total", task=name_of(quiet.sleeps_async)) == 0


async def heartbeat_running(obs: Observed) -> None:
    """Start the probe and let its heartbeat take its first step (its first due time)."""
    await taskscope.start_loop_probe(obs.telemetry)
    await anyio.sleep(0.02)


async def lag_samples(obs: Observed) -> tuple[float, float, float]:
    """(count, count above 5 ms, count above 250 ms) of the lag histogram."""
    await anyio.sleep(0.05)  # the heartbeat that fired late records its lag
    count = obs.value("taskscope_event_loop_lag_seconds_count")
    over_5ms = count - obs.value("taskscope_event_loop_lag_seconds_bucket", le="0.005")
    over_250ms = count - obs.value("taskscope_event_loop_lag_seconds_bucket", le="0.25")
    return count, over_5ms, over_250ms


async def test_many_short_blocks(anyio_backend: str) -> None:
    """30 x 20 ms with a yield between: no stall, but the busy time and the lag show it.

    (On asyncio the heartbeat, due during a step, runs after the task's next step: it
    waits up to about two steps, so the steps stay well under half the threshold.)
    """
    obs = observed()
    await heartbeat_running(obs)
    await run(obs, (blocking.short_blocks, (30, 0.02)))
    name = name_of(blocking.short_blocks)
    assert blocked(obs) == []
    assert obs.value("taskscope_task_loop_blocks_total", task=name) == 0.0
    assert obs.value("taskscope_task_loop_busy_seconds_total", task=name) >= 0.5
    count, over_5ms, _ = await lag_samples(obs)
    assert count >= 3
    assert over_5ms >= 1  # the heartbeat fired late behind the 20 ms steps


async def test_one_long_step_is_one_block(anyio_backend: str) -> None:
    """The same 600 ms without yields is one step: exactly one block of >= 0.55 s."""
    obs = observed()
    await heartbeat_running(obs)
    await run(obs, (blocking.one_long_step, ()))
    name = name_of(blocking.one_long_step)
    assert_one_block(
        obs, blocking.one_long_step, markers(BLOCKING_FILE, "long-step"), duration=0.55
    )
    assert obs.value("taskscope_task_loop_busy_seconds_total", task=name) >= 0.55
    _, _, over_250ms = await lag_samples(obs)
    assert over_250ms >= 1


# -- negative controls: waiting is not blocking ------------------------------------------------
async def test_waiting_without_blocking_reports_nothing(anyio_backend: str) -> None:
    """Awaited I/O, async sleeps, worker threads and sync tasks never count as blocks."""
    obs = observed()
    with slow_server(quiet.WAIT) as port:
        await run(
            obs,
            (quiet.awaits_socket, (port,)),
            (quiet.sleeps_async, ()),
            (quiet.sleeps_in_thread, ()),
            (quiet.sync_sleeps, ()),
        )
    assert blocked(obs) == []
    for func in (quiet.awaits_socket, quiet.sleeps_async, quiet.sleeps_in_thread):
        name = name_of(func)
        assert obs.outcomes()[(name, "success")] == 1.0
        assert obs.value("taskscope_task_loop_blocks_total", task=name) == 0.0
        assert obs.value("taskscope_task_loop_busy_seconds_total", task=name) < 0.05
    assert (
        obs.value(
            "taskscope_task_duration_seconds_sum",
            task=name_of(quiet.sync_sleeps),
            outcome="success",
        )
        >= 0.29
    )
    for span in obs.task_spans():
        assert not [e for e in span.events if e.name == "loop.blocked"]


async def test_idle_loop_reports_nothing(anyio_backend: str) -> None:
    """An idle loop with the probe running: lag samples, small ones, and no block."""
    obs = observed()
    await run(obs, (quiet.sleeps_async, ()))
    await anyio.sleep(0.3)
    assert blocked(obs) == []
    count, _, over_250ms = await lag_samples(obs)
    assert count >= 4
    assert over_250ms == 0
    assert obs.value("taskscope_instrumentation_errors_total", signal="loop_probe") == 0.0


async def test_threadpool_pressure_is_thread_wait_not_blocking(anyio_backend: str) -> None:
    """A sync task queued behind a busy worker thread: thread wait recorded, no loop block."""
    obs = observed()
    limiter = anyio.to_thread.current_default_thread_limiter()
    tokens = limiter.total_tokens
    limiter.total_tokens = 1
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, time.sleep, quiet.WAIT)
            await anyio.sleep(0.02)  # the only worker thread is taken now
            await run(obs, (quiet.sync_sleeps, ()))
    finally:
        limiter.total_tokens = tokens
    name = name_of(quiet.sync_sleeps)
    assert obs.value("taskscope_task_thread_wait_seconds_count", task=name) == 1.0
    assert obs.value("taskscope_task_thread_wait_seconds_sum", task=name) >= 0.2
    assert blocked(obs) == []
    assert obs.value("taskscope_task_loop_blocks_total", task=name) == 0.0


def test_through_a_starlette_app_and_the_test_client(anyio_backend: str) -> None:
    """End to end: a response's tasks, one blocking, one innocent, through TestClient."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route
    from starlette.testclient import TestClient

    obs = observed()

    async def endpoint(request: Request) -> Response:
        tasks = BackgroundTasks(telemetry=obs.telemetry)
        tasks.add_task(blocking.sleeps)
        tasks.add_task(blocking.innocent)
        return Response("ok", background=tasks)

    app = Starlette(routes=[Route("/", endpoint)])
    with TestClient(app, backend=anyio_backend) as client:  # type: ignore[arg-type]
        assert client.get("/").text == "ok"
    event = assert_one_block(obs, blocking.sleeps, markers(BLOCKING_FILE, "sleep"))
    assert event["ongoing"] is True
    assert obs.value("taskscope_task_loop_blocks_total", task=name_of(blocking.innocent)) == 0
