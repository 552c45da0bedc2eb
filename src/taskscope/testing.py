"""Test helpers: see what background tasks recorded; fail tests whose tasks blocked the loop.

``capture()`` collects the records taskscope produced (every task's :class:`TaskRecord`,
every blocking step's :class:`BlockRecord`, every hung-task report's :class:`HungRecord`).
``assert_no_blocking()`` raises when a task blocked the event loop. As a pytest plugin
(``pytest_plugins = ["taskscope.testing"]``), the ``taskscope_guard`` fixture gives a fresh
:class:`Telemetry` and fails the test when one of its background tasks blocked the loop or
failed, naming the task and the line.

These cover background tasks run through taskscope (its ``BackgroundTasks`` or an
instrumented app); blocks are the steps longer than the Telemetry's ``block_threshold``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

from taskscope._probe import settle
from taskscope._record import BlockRecord, HungRecord, TaskRecord
from taskscope._runtime import live_runtimes, runtime_created, runtime_of
from taskscope._stepping import OUTSIDE

if TYPE_CHECKING:
    from taskscope._config import Telemetry
    from taskscope._runtime import Runtime

__all__ = ("Captured", "Guard", "ListLogger", "assert_no_blocking", "capture", "reset")


class Captured:
    """What taskscope recorded while a :func:`capture` was open (appended as it happens)."""

    def __init__(self) -> None:
        self.tasks: list[TaskRecord] = []
        """One record per task that ended (any outcome)."""
        self.blocks: list[BlockRecord] = []
        """One per loop stall, when it ended (full duration; recorded when the loop's
        heartbeat comes back, or when the capture exits). Stalls outside background tasks
        have the task ``taskscope.OUTSIDE_TASKS``."""
        self.detections: list[BlockRecord] = []
        """The watchdog's reports while a block was still running (``ongoing=True``)."""
        self.hung: list[HungRecord] = []
        """One per report of a task running past ``hung_after`` (``task.hung``)."""
        self._lock = threading.Lock()

    def failures(self) -> list[TaskRecord]:
        return [t for t in self.tasks if t.outcome == "failure"]

    def blocking(
        self, threshold: float | None = None, *, outside: bool = False
    ) -> list[BlockRecord]:
        """Blocks of background tasks (ended, or still running if never ended) at least
        ``threshold`` long; ``outside=True`` also those of other code (an endpoint, a loop
        callback: task ``taskscope.OUTSIDE_TASKS``), which :func:`assert_no_blocking` and
        the guard do not count."""
        with self._lock:
            ended = list(self.blocks)
            ongoing = [
                d
                for d in self.detections
                if not any(_same_block(d, b) for b in ended)  # still blocking (a hang)
            ]
        found = ended + ongoing
        if not outside:
            found = [b for b in found if b.task != OUTSIDE]
        if threshold is not None:
            found = [b for b in found if b.duration >= threshold or b.ongoing]
        return found

    def problems(self, *, threshold: float | None = None, failures: bool = True) -> list[str]:
        """One line per blocking step (and per failed task), for an assertion message."""
        lines = [_describe_block(b) for b in self.blocking(threshold)]
        if failures:
            lines += [_describe_failure(t) for t in self.failures()]
        return lines

    def clear(self) -> None:
        with self._lock:
            self.tasks.clear()
            self.blocks.clear()
            self.detections.clear()
            self.hung.clear()

    # -- the sink interface of taskscope's runtime ---------------------------------------
    def task_started(self, name: str) -> None:
        pass

    def task_finished(self, name: str) -> None:
        pass

    def record(self, record: TaskRecord) -> None:
        with self._lock:
            self.tasks.append(record)

    def block_detected(self, block: BlockRecord) -> None:
        if block.ongoing:  # the ended record follows in block_ended
            with self._lock:
                self.detections.append(block)

    def block_ended(self, block: BlockRecord) -> None:
        with self._lock:
            self.blocks.append(block)

    def hung_detected(self, hung: HungRecord) -> None:
        with self._lock:
            self.hung.append(hung)

    def lag(self, seconds: float) -> None:
        pass

    def warning(self, name: str, kind: str) -> None:
        pass


def _same_block(detection: BlockRecord, ended: BlockRecord) -> bool:
    if detection.span_id is not None:
        return detection.span_id == ended.span_id and detection.task == ended.task
    return detection.task == ended.task and detection.location == ended.location


def _describe_block(block: BlockRecord) -> str:
    state = "still blocking after" if block.ongoing else "blocked the event loop for"
    return f"task {block.task} {state} {block.duration * 1e3:.0f} ms at {block.location}"


def _describe_failure(record: TaskRecord) -> str:
    message = f": {record.error_message}" if record.error_message else ""
    return f"task {record.name} failed with {record.error_type}{message}"


def _attach(runtime: Runtime, sink: Captured) -> None:
    runtime.add_sink("testing", sink)


def _detach(runtime: Runtime, sink: Captured) -> None:
    runtime.remove_sink(sink)


@contextmanager
def capture(telemetry: Telemetry | None = None) -> Iterator[Captured]:
    """Collect the records of ``telemetry``'s tasks (default: every Telemetry's)."""
    captured = Captured()
    attached: list[Runtime] = []

    def hook(runtime: Runtime) -> None:
        _attach(runtime, captured)
        attached.append(runtime)

    if telemetry is not None:
        hook(runtime_of(telemetry))
    else:
        for runtime in live_runtimes():
            hook(runtime)
        runtime_created.append(hook)
    try:
        yield captured
    finally:
        settle()  # a stall that just ended: its end recorded now, not a beat later
        if hook in runtime_created:
            runtime_created.remove(hook)
        for runtime in attached:
            _detach(runtime, captured)


def reset() -> None:
    """Undo taskscope's process-wide state between tests: as if nothing had run yet.

    :func:`~taskscope.uninstrument` (class patches, ``instrument_app`` scopes, the FastAPI
    import hook), every loop probe stopped (watchdog threads joined, asyncio task factories
    restored), the process default ``Telemetry`` forgotten (the next task creates a fresh
    one), :func:`capture` listeners and the name and task-kind caches cleared. The FastAPI
    rebind made by importing the drop-in ``BackgroundTasks`` stays: it belongs to that
    import, which a test module made once.
    """
    from taskscope import _probe, _run, _runtime, _task_kinds
    from taskscope._instrumentor import uninstrument

    uninstrument()
    _probe.close_all()
    with _runtime._create_lock:
        _runtime._default = None
    runtime_created.clear()
    _run._names_by_key.clear()
    _task_kinds._kinds.clear()


@contextmanager
def assert_no_blocking(
    telemetry: Telemetry | None = None, *, threshold: float | None = None
) -> Iterator[Captured]:
    """Raise ``AssertionError`` if a background task blocked the event loop inside the block.

    ``telemetry``: whose tasks to watch (default: every Telemetry's). ``threshold``: only
    blocks at least this long count (blocks shorter than the Telemetry's
    ``block_threshold`` are never detected, so a smaller value cannot see more).
    """
    if telemetry is not None and threshold is not None and threshold < telemetry.block_threshold:
        msg = (
            f"threshold={threshold} is below the telemetry's block_threshold="
            f"{telemetry.block_threshold}: shorter blocks are never detected"
        )
        raise ValueError(msg)
    with capture(telemetry) as captured:
        yield captured
    problems = captured.problems(threshold=threshold, failures=False)
    if problems:
        raise AssertionError("background tasks blocked the event loop:\n  " + "\n  ".join(problems))


class Guard:
    """The ``taskscope_guard`` fixture: the test's background tasks must not block or fail.

    While it is active it sees the tasks of every Telemetry (a module-level app's, the
    drop-in classes' default, one given to ``instrument_app``) and, through
    :func:`taskscope.instrument`, the plain Starlette/FastAPI tasks of apps that are not
    instrumented at all (recorded with :attr:`telemetry`, a fresh one: its own registry and
    a :class:`ListLogger`). ``allow_blocking`` / ``allow_failures`` switch a check off for
    one test; ``captured`` holds what was recorded; ``logs`` the events of :attr:`telemetry`.
    """

    def __init__(self, **options: Any) -> None:
        from prometheus_client import CollectorRegistry

        from taskscope._config import Telemetry

        self.registry = CollectorRegistry()
        self.logs: list[dict[str, Any]] = []
        options.setdefault("span_mode", "off")
        options.setdefault("otel_metrics", False)
        self.telemetry = Telemetry(registry=self.registry, logger=ListLogger(self.logs), **options)
        self.allow_blocking = False
        self.allow_failures = False
        self._active = ExitStack()
        self.captured = self._active.enter_context(capture())
        runtime_of(self.telemetry)  # created now: captured from the first task on

    def __enter__(self) -> Guard:
        from taskscope._instrumentor import instrument, is_instrumented, uninstrument

        if not is_instrumented():
            instrument(self.telemetry)
            self._active.callback(uninstrument)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._active.close()

    def problems(self) -> list[str]:
        lines: list[str] = []
        if not self.allow_blocking:
            lines += [_describe_block(b) for b in self.captured.blocking()]
        if not self.allow_failures:
            lines += [_describe_failure(t) for t in self.captured.failures()]
        return lines

    def check(self) -> None:
        """Raise ``AssertionError`` listing every block and failure (then forget them)."""
        problems = self.problems()
        self.captured.clear()
        if problems:
            raise AssertionError("taskscope_guard:\n  " + "\n  ".join(problems))


class ListLogger:
    """A structlog-compatible logger that keeps each event as a dict (``Telemetry(logger=)``)."""

    def __init__(self, events: list[dict[str, Any]] | None = None) -> None:
        self.events: list[dict[str, Any]] = [] if events is None else events

    def named(self, event: str) -> list[dict[str, Any]]:
        """The recorded events called ``event`` (e.g. ``"task.failed"``)."""
        return [e for e in self.events if e["event"] == event]

    def _log(self, level: str, event: str, **kw: Any) -> None:
        self.events.append({"event": event, "level": level, **kw})

    def debug(self, event: str, **kw: Any) -> None:
        self._log("debug", event, **kw)

    def info(self, event: str, **kw: Any) -> None:
        self._log("info", event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._log("warning", event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._log("error", event, **kw)


try:
    import pytest
except ImportError:  # pragma: no cover - the helpers above work without pytest
    pass
else:

    @pytest.fixture
    def taskscope_guard() -> Iterator[Guard]:
        """The test fails if one of its background tasks blocked the loop or failed.

        Works with the app as it is (module-level, drop-in classes, ``instrument_app`` or
        nothing); ``taskscope_guard.telemetry`` is there for tests that want their own.
        """
        with Guard() as guard:
            yield guard
            _fail_on_problems(guard)  # what ended after the test function (teardown)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
        """Fail the test itself (not its teardown) when its guard saw a block or failure;
        a test that raised keeps its own failure, with the guard's findings as a note."""
        guard = getattr(item, "funcargs", {}).get("taskscope_guard")
        if not isinstance(guard, Guard):
            return (yield)
        try:
            result = yield
        except BaseException as exc:
            problems = guard.problems()
            guard.captured.clear()  # reported here, once: not again at teardown
            if problems:
                exc.add_note("taskscope_guard:\n  " + "\n  ".join(problems))
            raise
        _fail_on_problems(guard)
        return result

    def _fail_on_problems(guard: Guard) -> None:
        problems = guard.problems()
        guard.captured.clear()
        if problems:
            pytest.fail("taskscope_guard:\n  " + "\n  ".join(problems), pytrace=False)
