"""The loop probe: lag heartbeat, per-step blocking detection and the watchdog thread.

One probe per running event loop (asyncio, uvloop or trio), started lazily by the first
monitored task, by :func:`start_loop_probe` or by :func:`lifespan`, stopped with the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import threading
import time
import weakref
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from taskscope import _hung, _stepping
from taskscope._stepping import StepMonitor, TimedCoroutine, current_run

if TYPE_CHECKING:
    from types import TracebackType

    from taskscope._config import Telemetry
    from taskscope._run import TaskRun
    from taskscope._runtime import Runtime

_probes: weakref.WeakKeyDictionary[Any, LoopProbe] = weakref.WeakKeyDictionary()
_probes_lock = threading.Lock()
# trio: the task whose own coroutine a TimedCoroutine times (its children inherit
# ``current_run`` and are timed by the instrument; this one is not, or it would count twice).
_wrapped_task: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "taskscope_wrapped_task", default=None
)


async def monitored(awaitable: Awaitable[Any], run: TaskRun) -> Any:
    """Await a task's coroutine with its steps timed (when the probe is on)."""
    runtime = run.runtime
    probe = probe_for(runtime) if runtime.telemetry.loop_probe else None
    if probe is None:
        return await awaitable
    token = current_run.set(run)
    try:
        if not inspect.iscoroutine(awaitable):
            return await awaitable  # trio times it as a task step; asyncio cannot
        if probe.library != "trio":
            return await TimedCoroutine(awaitable, run, probe.monitor)
        import trio

        wrapped = _wrapped_task.set(trio.lowlevel.current_task())
        try:
            return await TimedCoroutine(awaitable, run, probe.monitor)
        finally:
            _wrapped_task.reset(wrapped)
    finally:
        current_run.reset(token)


def _loop_key() -> tuple[str, Any]:
    loop = asyncio._get_running_loop()  # None outside asyncio
    if loop is not None:
        return "asyncio", loop
    import trio

    return "trio", trio.lowlevel.current_trio_token()


def probe_for(runtime: Runtime) -> LoopProbe | None:
    """The probe of the running loop (started now if needed), subscribed to ``runtime``."""
    try:
        library, key = _loop_key()
        probe = _probes.get(key)
        if probe is None:
            with _probes_lock:
                probe = _probes.get(key)
                if probe is None:
                    probe = LoopProbe(library, key, runtime.telemetry)
                    _probes[key] = probe
            probe.start()
        if runtime is not probe.last_runtime:
            probe.subscribe(runtime)
        return probe
    except Exception:
        runtime.absorb("loop_probe")
        return None


def start_watchdog(runtime: Runtime) -> None:
    """Make sure the running loop's probe (and its watchdog) runs for ``runtime``: the
    hung-task check of sync tasks, which never go through :func:`monitored`."""
    if runtime.telemetry.loop_probe:
        probe_for(runtime)


async def start_loop_probe(telemetry: Telemetry | None = None) -> None:
    """Start the loop probe for the running loop now (e.g. in an app's lifespan).

    Otherwise it starts with the first background task. Idempotent per loop.
    """
    from taskscope._runtime import resolve, runtime_of

    probe_for(runtime_of(resolve(telemetry)))


class lifespan:  # noqa: N801 - used like a function: ``async with taskscope.lifespan(t):``
    """Run the loop probe for the life of an app (lag from the start, clean shutdown).

    An async context manager: ``async with taskscope.lifespan(telemetry): yield`` inside an
    app's lifespan; or pass it as the lifespan itself: ``Starlette(lifespan=lifespan(t))``.
    On exit the probe stops: heartbeat cancelled, watchdog thread joined, the asyncio task
    factory restored (a later task starts a new probe).
    """

    def __init__(self, telemetry: Telemetry | None = None) -> None:
        self.telemetry = telemetry
        self._probe: LoopProbe | None = None

    def __call__(self, app: object) -> lifespan:
        return self

    async def __aenter__(self) -> None:
        from taskscope._runtime import resolve, runtime_of

        telemetry = resolve(self.telemetry)
        if telemetry.loop_probe:
            self._probe = probe_for(runtime_of(telemetry))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.close()


def _poll_for(threshold: float) -> float:
    """Longest watchdog sleep: a step that starts meanwhile is still seen in time."""
    return min(max(threshold / 2, 0.001), 0.25)


class LoopProbe:
    """Heartbeat task on the loop + watchdog thread + step timing hooks."""

    def __init__(self, library: str, key: Any, telemetry: Telemetry) -> None:
        self.library = library
        self.interval = telemetry.lag_interval
        self.monitor = StepMonitor(threading.get_ident())
        self.runtimes: weakref.WeakSet[Runtime] = weakref.WeakSet()
        self.last_runtime: Runtime | None = None
        self.poll = _poll_for(telemetry.block_threshold)
        self.hung_period: float | None = None  # seconds between two hung-task scans
        self.scans = 0
        self._key = weakref.ref(key)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._task: Any = None
        self._cancel_scope: Any = None
        self._previous_factory: Any = None
        self._instrument: _TrioStepInstrument | None = None

    def subscribe(self, runtime: Runtime) -> None:
        self.last_runtime = runtime  # per-task fast path: no WeakSet lookup
        self.runtimes.add(runtime)
        self.poll = min(self.poll, _poll_for(runtime.telemetry.block_threshold))
        hung_after = runtime.telemetry.hung_after
        if hung_after is not None:
            period = _hung.scan_period(hung_after)
            if self.hung_period is None or period < self.hung_period:
                self.hung_period = period

    def start(self) -> None:
        """Install the hooks and start the heartbeat and the watchdog (on the loop thread)."""
        if self._started:
            return
        self._started = True
        clean = contextvars.Context()  # neither a taskscope run nor a trace is inherited
        if self.library == "trio":
            import trio

            self._instrument = _TrioStepInstrument(self.monitor)
            trio.lowlevel.add_instrument(self._instrument)  # type: ignore[arg-type]
            trio.lowlevel.spawn_system_task(
                self._heartbeat, name="taskscope-loop-probe", context=clean
            )
        else:
            loop = self._loop = asyncio.get_running_loop()
            self._previous_factory = loop.get_task_factory()
            loop.set_task_factory(self._task_factory)
            self._task = loop.create_task(self._heartbeat(), context=clean)
        self._thread = threading.Thread(
            target=self._watch, name="taskscope-loop-watchdog", daemon=True
        )
        self._thread.start()

    def _task_factory(self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        context = kwargs.get("context")
        run = context.get(current_run) if context is not None else current_run.get()
        if run is not None and not self._stop.is_set() and inspect.iscoroutine(coro):
            coro = TimedCoroutine(coro, run, self.monitor)
        if self._previous_factory is not None:
            return self._previous_factory(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    async def _heartbeat(self) -> None:
        sleep: Any
        if self.library == "trio":
            import trio

            sleep = trio.sleep
            self._cancel_scope = trio.CancelScope()
            scope = self._cancel_scope
        else:
            sleep = asyncio.sleep
            scope = _NullScope()
        clock = _stepping.clock
        try:
            with scope:
                while not self._stop.is_set():
                    interval = self.interval
                    due = clock() + interval
                    await sleep(interval)
                    lag = max(0.0, clock() - due)
                    for runtime in list(self.runtimes):
                        runtime.lag(lag)
        finally:
            self.stop()

    def close(self) -> None:
        """Stop now and cancel the heartbeat (an app's lifespan ends)."""
        self.stop()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    def stop(self) -> None:
        """Unhook from the loop and end the watchdog thread (idempotent)."""
        self._stop.set()
        if self._instrument is not None:
            import trio

            instrument, self._instrument = self._instrument, None
            with contextlib.suppress(KeyError, RuntimeError):
                trio.lowlevel.remove_instrument(instrument)  # type: ignore[arg-type]
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                if loop.get_task_factory() == self._task_factory:
                    loop.set_task_factory(self._previous_factory)
            except RuntimeError:  # pragma: no cover - closed meanwhile
                pass
        self._forget()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=1.0)

    def _forget(self) -> None:
        key = self._key()
        if key is not None:
            with _probes_lock:
                if _probes.get(key) is self:
                    del _probes[key]

    def _watch(self) -> None:
        monitor, stop, loop = self.monitor, self._stop, self._loop
        delay = self.poll
        next_scan = time.perf_counter()
        while not stop.wait(delay):
            if loop is not None and loop.is_closed():
                # Closed without its tasks cancelled: nothing will stop us but us.
                stop.set()
                self._forget()
                break
            try:
                delay = monitor.sample(self.poll)
            except Exception:
                delay = self.poll
                for runtime in list(self.runtimes):
                    runtime.absorb("loop_probe")
            period = self.hung_period
            if period is not None:
                now = time.perf_counter()  # real time: the schedule of the scans
                if now >= next_scan:
                    self.scan_hung()
                    next_scan = now + period
                delay = min(delay, next_scan - now)

    def scan_hung(self) -> None:
        """The hung-task check of every runtime on this loop (watchdog thread)."""
        for runtime in list(self.runtimes):
            try:
                _hung.check(runtime)
                runtime.refresh_oldest()
            except Exception:
                runtime.absorb("loop_probe")
        self.scans += 1


class _NullScope:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class _TrioStep:
    """The step of a trio task (one at a time per loop), for the monitor and the watchdog."""

    __slots__ = ("coro", "run", "started", "threshold")

    def __init__(self, run: TaskRun, coro: Any) -> None:
        self.run = run
        self.coro = coro
        self.threshold = run.threshold
        self.started = 0.0


class _TrioStepInstrument:
    """Times the steps of trio tasks started by a taskscope task (nursery children).

    The taskscope task's own coroutine is timed by a :class:`TimedCoroutine`, as on asyncio.
    """

    def __init__(self, monitor: StepMonitor) -> None:
        self.monitor = monitor
        self._step: _TrioStep | None = None
        self._outer: Any = None

    def before_task_step(self, task: Any) -> None:
        context = task.context
        run = context.get(current_run)
        if run is not None and context.get(_wrapped_task) is not task:
            step = self._step = _TrioStep(run, task.coro)
            self._outer = self.monitor.enter(step)

    def after_task_step(self, task: Any) -> None:
        step = self._step
        if step is not None:
            self._step = None
            self.monitor.exit(step, self._outer)


def close_all() -> None:
    """Stop every loop probe of the process (``taskscope.testing.reset``): watchdogs
    joined, hooks removed. A probe whose loop still runs stops its heartbeat at its next
    beat; a later task starts a new probe."""
    with _probes_lock:
        probes = list(_probes.values())
    for probe in probes:
        probe.stop()
