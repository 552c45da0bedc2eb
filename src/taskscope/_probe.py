"""The loop probe: a heartbeat on the loop and a watchdog thread that samples it.

One probe per running event loop (asyncio, uvloop or trio), started lazily by the first
monitored task, by :func:`start_loop_probe` or by :func:`lifespan`, stopped with the loop.

No code runs per step, and per task only :func:`monitored`'s context variable:

- **Heartbeat** (a task on the loop): every ``beat`` seconds (a fifth of the smallest block
  threshold on the loop, between 2 and 25 ms: 20 ms at the default 100 ms) it stores the
  time it ran and the time it is due next (two float stores). Lag: the largest lateness of
  the beats of each ``lag_interval`` is observed once per ``lag_interval``.
- **Watchdog** (a thread): once the heartbeat is ``threshold`` late the loop is stalled,
  whatever holds it (one long step, many short steps in one iteration, a callback). It
  samples the loop thread's stack, blames the background task running (children included,
  see :mod:`taskscope._stepping`) or reports the stall as outside background tasks
  (:data:`~taskscope._stepping.OUTSIDE`), at ``file:line``; ``block_detected`` (ongoing)
  once per stall, past that runtime's own threshold (several Telemetry objects can share
  a loop: the smallest threshold drives detection), to the blamed task's runtime, or for
  a stall outside background tasks to every runtime on the loop. When the heartbeat
  comes back the stall ends: ``block_ended`` with its duration, measured by the heartbeat
  (how late it ran: the time the loop was not available, a lower bound of the blocking
  code's own time by at most one beat).
- **Not seen**: a stall during which the watchdog never ran (its thread starved of CPU
  for the whole stall, or a C call holding the GIL until the loop is back at the
  heartbeat) shows only in the lag histogram; a C call that holds the GIL is usually
  sampled as it returns, in the task's next line.
- **Busy time** (``loop_busy``) is a sampled estimate: at each look (about once per
  threshold while the loop is free, twice per threshold during a stall) the watchdog
  credits the time since its previous look to the background task whose code runs on the
  loop (none if the loop waits in its selector). Right on average over many tasks, with a
  resolution of about a threshold: a short task is usually credited nothing, and now and
  then a whole interval. Each look takes the GIL from a busy loop (two thread switches),
  hence few looks.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
import weakref
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from taskscope import _hung, _stepping
from taskscope._record import BlockRecord
from taskscope._stepping import OUTSIDE, Blamer, Stall, current_run, describe

if TYPE_CHECKING:
    from types import TracebackType

    from taskscope._config import Telemetry
    from taskscope._run import TaskRun
    from taskscope._runtime import Runtime

_probes: weakref.WeakKeyDictionary[Any, LoopProbe] = weakref.WeakKeyDictionary()
_probes_lock = threading.Lock()
_get_ident = threading.get_ident
_MAX_SPAN_STALLS = 64  # span events kept per task (a long task that keeps stalling)
# The asyncio loop of the latest lookup and its probe: the per-task fast path of
# :func:`probe_for` (one tuple read, a thread id and a running check). Cleared when that
# probe stops.
_last: tuple[Any, LoopProbe | None] = (None, None)


def _remember(key: Any, probe: LoopProbe) -> None:
    global _last  # noqa: PLW0603 - a one-entry cache, replaced whole (atomic)
    _last = (key, probe)


def enter_run(run: TaskRun) -> contextvars.Token[TaskRun | None] | None:
    """Before a task's coroutine is awaited: the loop's probe (started if needed) and
    :data:`current_run` set for the task's code and the children it starts (the watchdog
    reads it in the running task's context). Returns the token for :func:`exit_run`, or
    None when the probe is off or could not start. Nothing per step; no coroutine wrapper.
    """
    runtime = run.runtime
    if not runtime.telemetry.loop_probe:
        return None
    loop, probe = _last  # probe_for's fast path, inlined (it runs once per task)
    if (
        probe is None
        or runtime is not probe.last_runtime
        or probe.loop_thread != _get_ident()
        or not loop.is_running()
    ):
        probe = probe_for(runtime)
        if probe is None:
            return None
    return current_run.set(run)


def exit_run(run: TaskRun, token: contextvars.Token[TaskRun | None] | None) -> None:
    """After the task's coroutine: :data:`current_run` back; the stalls blamed on the task
    become span events (before its span ends)."""
    if token is not None:
        current_run.reset(token)
        if run.stalls:  # rare: blamed for a stall
            _stepping.add_span_events(run)


async def monitored(awaitable: Awaitable[Any], run: TaskRun) -> Any:
    """Await ``awaitable`` as ``run``'s code (:func:`enter_run`/:func:`exit_run` around it)."""
    token = enter_run(run)
    try:
        return await awaitable
    finally:
        exit_run(run, token)


def _loop_key() -> tuple[str, Any]:
    loop = asyncio._get_running_loop()  # None outside asyncio
    if loop is not None:
        return "asyncio", loop
    import trio

    return "trio", trio.lowlevel.current_trio_token()


def probe_for(runtime: Runtime) -> LoopProbe | None:
    """The probe of the running loop (started now if needed), subscribed to ``runtime``."""
    loop, probe = _last  # one read: (loop, probe) of the latest lookup, or of none
    # That loop runs in this thread: it is the running loop (one per thread at a time).
    # (Cheaper than asyncio._get_running_loop(), ~0.3 µs on 3.11.)
    if probe is not None and probe.loop_thread == threading.get_ident() and loop.is_running():
        if runtime is not probe.last_runtime:
            probe.subscribe(runtime)
        return probe
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
        if library == "asyncio" and not probe._stop.is_set():
            _remember(key, probe)
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
    On exit the probe stops: heartbeat cancelled, watchdog thread joined (a later task
    starts a new probe).
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


def beat_for(threshold: float) -> float:
    """Heartbeat period for a block threshold: a fifth of it, 2 ms to 25 ms.

    A stall is reported between ``threshold`` and ``threshold + beat`` after it started.
    """
    return min(max(threshold / 5, 0.002), 0.025)


def _stall_poll(threshold: float) -> float:
    """The watchdog's period during a stall: busy samples, the end, larger thresholds."""
    return min(max(threshold / 2, 0.002), 0.25)


def settle() -> None:
    """End the running loop's open stall now (on the loop thread: it is running again).

    :func:`taskscope.testing.capture` calls it on exit, so that a stall that ended just
    before is recorded in full before its sink is detached (otherwise the watchdog records
    the end when the heartbeat comes back, a beat later).
    """
    try:
        _, key = _loop_key()
    except Exception:
        return
    probe = _probes.get(key)
    if probe is not None:
        stall = probe.stall
        if stall is not None:
            probe.end_stall(stall, _stepping.clock())


class LoopProbe:
    """Heartbeat task on the loop + watchdog thread (stall detection, blame, busy samples)."""

    def __init__(self, library: str, key: Any, telemetry: Telemetry) -> None:
        self.library = library
        self.interval = telemetry.lag_interval
        self.threshold = telemetry.block_threshold  # the smallest of the runtimes'
        self.beat = beat_for(self.threshold)
        self.stall_poll = _stall_poll(self.threshold)
        self.loop_thread = threading.get_ident()
        self.runtimes: weakref.WeakSet[Runtime] = weakref.WeakSet()
        self.last_runtime: Runtime | None = None
        self.hung_period: float | None = None  # seconds between two hung-task scans
        self.scans = 0
        now = _stepping.clock()
        # Written by the heartbeat (loop thread), read by the watchdog.
        self.beat_at = now  # when the heartbeat last ran
        self.due = now + self.beat  # when it runs next, if the loop is free
        self.came_back = 0.0  # when a late beat (past the threshold) ran
        # The watchdog's.
        self.stall: Stall | None = None
        self.lock = threading.Lock()  # ends a stall once (watchdog or :func:`settle`)
        self._last_stall_due = -1.0  # one stall per missed beat
        self._last_sample = now
        self._blamer: Blamer | None = None
        self._key = weakref.ref(key)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._task: Any = None
        self._cancel_scope: Any = None

    def subscribe(self, runtime: Runtime) -> None:
        self.last_runtime = runtime  # per-task fast path: no WeakSet lookup
        self.runtimes.add(runtime)
        threshold = runtime.telemetry.block_threshold
        if threshold < self.threshold:
            self.threshold = threshold
            self.beat = beat_for(threshold)
            self.stall_poll = _stall_poll(threshold)
        hung_after = runtime.telemetry.hung_after
        if hung_after is not None:
            period = _hung.scan_period(hung_after)
            if self.hung_period is None or period < self.hung_period:
                self.hung_period = period

    def start(self) -> None:
        """Start the heartbeat and the watchdog (on the loop thread)."""
        if self._started:
            return
        self._started = True
        import contextvars

        clean = contextvars.Context()  # neither a taskscope run nor a trace is inherited
        if self.library == "trio":
            import trio

            self._blamer = Blamer("trio", self.loop_thread, None, trio.lowlevel.current_root_task())
            trio.lowlevel.spawn_system_task(
                self._heartbeat, name="taskscope-loop-probe", context=clean
            )
        else:
            loop = self._loop = asyncio.get_running_loop()
            self._blamer = Blamer("asyncio", self.loop_thread, loop, None)
            self._task = loop.create_task(self._heartbeat(), context=clean)
        self._thread = threading.Thread(
            target=self._watch, name="taskscope-loop-watchdog", daemon=True
        )
        self._thread.start()

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
        worst = 0.0  # the largest lag since the last observation
        next_lag = clock() + self.interval
        try:
            with scope:
                while not self._stop.is_set():
                    beat = self.beat
                    now = clock()
                    self.beat_at = now
                    self.due = due = now + beat  # the watchdog's one read
                    await sleep(beat)
                    now = clock()
                    lag = now - due
                    if lag >= self.threshold:
                        self.came_back = now  # the end of a stall
                    worst = max(worst, lag)
                    if now >= next_lag:
                        for runtime in list(self.runtimes):
                            runtime.lag(worst)
                        worst = 0.0
                        next_lag += self.interval
                        if next_lag < now:  # after a stall: no burst of observations
                            next_lag = now + self.interval
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
        """End the watchdog thread (idempotent)."""
        self._stop.set()
        self._forget()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=1.0)

    def _forget(self) -> None:
        global _last  # noqa: PLW0603 - see _remember
        key = self._key()
        with _probes_lock:
            if _last[1] is self:
                _last = (None, None)
            if key is not None and _probes.get(key) is self:
                del _probes[key]

    # -- the watchdog thread -------------------------------------------------------------
    def _watch(self) -> None:
        stop, loop = self._stop, self._loop
        delay = 0.0
        next_scan = time.perf_counter()
        while not stop.wait(delay):
            if loop is not None and loop.is_closed():
                # Closed without its tasks cancelled: nothing will stop us but us.
                stop.set()
                self._forget()
                break
            try:
                delay = self.check()
            except Exception:
                delay = self.beat
                for runtime in list(self.runtimes):
                    runtime.absorb("loop_probe")
            period = self.hung_period
            if period is not None:
                now = time.perf_counter()  # real time: the schedule of the scans
                if now >= next_scan:
                    self.scan_hung()
                    next_scan = now + period
                delay = min(delay, next_scan - now)
        stall = self.stall
        if stall is not None:  # the loop ended inside a stall (or stopped): close it
            self.end_stall(stall, _stepping.clock())

    def check(self) -> float:
        """One look at the loop: open, report or end a stall; sample busy time.

        Returns the seconds until the next look: when the heartbeat would be a threshold
        late (about a threshold away while the loop is free: each look takes the GIL from
        a busy loop, so they are few), or during a stall half a threshold (or less, for a
        runtime's larger threshold).
        """
        clock = _stepping.clock
        now = clock()
        due = self.due
        stall = self.stall
        if stall is not None and due != stall.due:  # the heartbeat came back
            self.end_stall(stall, max(self.came_back, self.beat_at))
            stall = None
        self._sample_busy(now)
        overdue = now - due
        if stall is None:
            if due == self._last_stall_due:  # ended early (settle): one stall per beat
                return self.stall_poll
            if overdue < self.threshold:
                return max(due + self.threshold - now, 0.0005)
            stall = self.open_stall(due)
            if stall is None:  # idle, woken late: not a stall (yet)
                return self.beat
        return self.report(stall, overdue)

    def _sample_busy(self, now: float) -> None:
        elapsed = now - self._last_sample
        self._last_sample = now
        blamer = self._blamer
        if blamer is None:
            return
        run = blamer.run_now()
        if run is not None:
            run.busy += elapsed  # only the watchdog writes it while the task runs

    def open_stall(self, due: float) -> Stall | None:
        """The heartbeat is past the threshold: sample the loop thread, blame, remember.

        ``None`` when no code holds the loop (see :meth:`Blamer.blame`): looked at again.
        """
        assert self._blamer is not None
        blamed = self._blamer.blame()
        if blamed is None:
            return None
        run, frames = blamed
        location, stack = describe(frames)
        stall = Stall(due, run, location, stack)
        stall.half_beat = self.beat / 2
        self._last_stall_due = due
        self.stall = stall
        return stall

    def report(self, stall: Stall, overdue: float) -> float:
        """``block_detected`` (ongoing), once, past the runtime's own threshold: to the
        blamed task's runtime; a stall outside background tasks to every runtime on the
        loop (no Telemetry owns it). A stall is counted once per cause: another
        Telemetry's task is not reported as outside this one's tasks."""
        told = {id(runtime) for runtime, _, _ in stall.reported}
        wait = self.stall_poll
        run = stall.run
        for runtime in list(self.runtimes):
            if id(runtime) in told or (run is not None and run.runtime is not runtime):
                continue
            threshold = runtime.telemetry.block_threshold
            if overdue < threshold:
                wait = min(wait, threshold - overdue)
                continue
            block = BlockRecord(
                OUTSIDE if run is None else run.name,
                overdue,
                stall.location,
                stall.stack,
                True,
                True,
                None if run is None else run.trace_id,
                None if run is None else run.span_id,
            )
            with self.lock:
                if stall.ended:
                    return wait
                stall.reported.append((runtime, run, block))
                if run is not None:
                    run.blocks += 1
                    if run.stalls is None:
                        run.stalls = [stall]
                    elif len(run.stalls) < _MAX_SPAN_STALLS:
                        run.stalls.append(stall)
                # Inside the lock: the end (another thread) is reported after this.
                runtime.block_detected(block)
        return max(wait, 0.0005)

    def end_stall(self, stall: Stall, end: float) -> None:
        """The loop is back: ``block_ended`` with the measured duration (within half a beat),
        to each runtime told of the stall (the watchdog, or :func:`settle` on the loop
        thread)."""
        with self.lock:
            if stall.ended:
                return
            reported = list(stall.reported)
            told = max((b.duration for _, _, b in reported), default=0.0)
            # The stall began between the last beat and the next one's due time: counted
            # from the middle of that window (``end - due`` alone is short by half a beat
            # on average: a 150 ms sleep read as 140 ms at the default 20 ms beat).
            stall.duration = max(end - stall.due + stall.half_beat, told)
            stall.ended = True
            if self.stall is stall:
                self.stall = None
        for runtime, _, detected in reported:
            block = BlockRecord(
                detected.task,
                stall.duration,
                detected.location,
                detected.stack,
                True,
                False,
                detected.trace_id,
                detected.span_id,
            )
            runtime.block_ended(block, reported=True)

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


def close_all() -> None:
    """Stop every loop probe of the process (``taskscope.testing.reset``): watchdogs
    joined, hooks removed. A probe whose loop still runs stops its heartbeat at its next
    beat; a later task starts a new probe."""
    with _probes_lock:
        probes = list(_probes.values())
    for probe in probes:
        probe.stop()
