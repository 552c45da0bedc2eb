"""The loop probe: lag heartbeat, per-step blocking detection and the watchdog thread.

One probe per running event loop (asyncio, uvloop or trio), started lazily by the first
monitored task or explicitly (:func:`start_loop_probe`), stopped with the loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
import weakref
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import sniffio

from taskscope._stepping import StepMonitor, TimedCoroutine, current_run

if TYPE_CHECKING:
    from taskscope._config import Telemetry
    from taskscope._run import TaskRun
    from taskscope._runtime import Runtime

_probes: weakref.WeakKeyDictionary[Any, LoopProbe] = weakref.WeakKeyDictionary()
_probes_lock = threading.Lock()


async def monitored(awaitable: Awaitable[Any], run: TaskRun) -> Any:
    """Await a task's coroutine with its steps timed (when the probe is on)."""
    token = current_run.set(run)
    try:
        runtime = run.runtime
        probe = probe_for(runtime) if runtime.telemetry.loop_probe else None
        if probe is None:
            return await awaitable
        if probe.wraps_coroutines:
            if inspect.iscoroutine(awaitable):
                return await TimedCoroutine(awaitable, run, probe.monitor)
            return await awaitable
        # trio: steps are timed by an Instrument from the next step on; start one now
        # so that the task's first statements are not part of the caller's step.
        import trio

        await trio.lowlevel.cancel_shielded_checkpoint()
        return await awaitable
    finally:
        current_run.reset(token)


def probe_for(runtime: Runtime) -> LoopProbe | None:
    """The probe of the running loop (started now if needed), subscribed to ``runtime``."""
    try:
        library = sniffio.current_async_library()
        key: Any
        if library == "trio":
            import trio

            key = trio.lowlevel.current_trio_token()
        else:
            key = asyncio.get_running_loop()
        probe = _probes.get(key)
        if probe is None:
            with _probes_lock:
                probe = _probes.get(key)
                if probe is None:
                    probe = LoopProbe(library, key, runtime.telemetry)
                    _probes[key] = probe
                    probe.start()
        if runtime not in probe.runtimes:
            probe.runtimes.add(runtime)
        return probe
    except Exception:
        runtime.absorb("loop_probe")
        return None


async def start_loop_probe(telemetry: Telemetry | None = None) -> None:
    """Start the loop probe for the running loop now (e.g. in an app's lifespan).

    Otherwise it starts with the first background task. Idempotent per loop.
    """
    from taskscope._runtime import resolve, runtime_of

    probe_for(runtime_of(resolve(telemetry)))


class LoopProbe:
    """Heartbeat task on the loop + watchdog thread + step timing hooks."""

    def __init__(self, library: str, key: Any, telemetry: Telemetry) -> None:
        self.library = library
        self.wraps_coroutines = library != "trio"  # trio: an Instrument times steps
        self.interval = telemetry.lag_interval
        self.clock = telemetry.clock
        self.monitor = StepMonitor(telemetry.clock, threading.get_ident())
        self.runtimes: weakref.WeakSet[Runtime] = weakref.WeakSet()
        self.poll = min(max(telemetry.block_threshold / 4, 0.005), 0.05)
        self._key = weakref.ref(key)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._task: Any = None
        self._previous_factory: Any = None
        self._instrument: Any = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._watch, name="taskscope-loop-watchdog", daemon=True
        )
        self._thread.start()
        clean = contextvars.Context()  # neither a taskscope run nor a trace is inherited
        if self.library == "trio":
            import trio

            self._instrument = _TrioStepInstrument(self.monitor)
            trio.lowlevel.add_instrument(self._instrument)
            trio.lowlevel.spawn_system_task(
                self._heartbeat, name="taskscope-loop-probe", context=clean
            )
        else:
            loop = asyncio.get_running_loop()
            self._previous_factory = loop.get_task_factory()
            loop.set_task_factory(self._task_factory)
            self._task = loop.create_task(self._heartbeat(), context=clean)

    def _task_factory(self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        context = kwargs.get("context")
        run = context.get(current_run) if context is not None else current_run.get()
        if run is not None and inspect.iscoroutine(coro):
            coro = TimedCoroutine(coro, run, self.monitor)
        if self._previous_factory is not None:
            return self._previous_factory(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    async def _heartbeat(self) -> None:
        sleep: Any
        if self.library == "trio":
            import trio

            sleep = trio.sleep
        else:
            sleep = asyncio.sleep
        clock, interval = self.clock, self.interval
        try:
            while True:
                due = clock() + interval
                await sleep(interval)
                lag = max(0.0, clock() - due)
                for runtime in list(self.runtimes):
                    runtime.lag(lag)
        finally:
            self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self.library == "trio" and self._instrument is not None:
            import trio

            try:
                trio.lowlevel.remove_instrument(self._instrument)
            except (KeyError, RuntimeError):
                pass
        elif self.library != "trio":
            try:
                loop = asyncio.get_running_loop()
                if loop.get_task_factory() == self._task_factory:
                    loop.set_task_factory(self._previous_factory)
            except RuntimeError:
                pass
        key = self._key()
        if key is not None:
            with _probes_lock:
                if _probes.get(key) is self:
                    del _probes[key]

    def _watch(self) -> None:
        monitor, poll, stop = self.monitor, self.poll, self._stop
        while not stop.wait(poll):
            try:
                monitor.sample()
            except Exception:
                for runtime in list(self.runtimes):
                    runtime.absorb("loop_probe")


class _TrioStepInstrument:
    """Times the steps of trio tasks that run (or were started by) a taskscope task."""

    def __init__(self, monitor: StepMonitor) -> None:
        self.monitor = monitor
        self._outer: tuple[Any, float] = (None, 0.0)
        self._timed = False

    def before_task_step(self, task: Any) -> None:
        run = task.context.get(current_run)
        if run is not None:
            self._outer = self.monitor.enter(run)
            self._timed = True

    def after_task_step(self, task: Any) -> None:
        if self._timed:
            self._timed = False
            coro = getattr(task, "coro", None)
            self.monitor.exit(self._outer, coro)
