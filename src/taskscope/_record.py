"""The frozen record of one task's run: every signal is fed from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

Outcome = Literal[
    "success",
    "failure",
    "cancelled",
    "skipped",
    "abandoned",
    # Queue workers (taskscope.celery, taskscope.taskiq) only:
    "retry",
    "revoked",
    "rejected",
]
OUTSIDE_TASKS = "<outside background tasks>"
"""The ``task`` of a loop stall caused by code that is not a background task (of that
Telemetry): an endpoint, a middleware, a loop callback, another library's task."""
NOT_RUN_OUTCOMES: frozenset[str] = frozenset({"skipped", "abandoned", "revoked", "rejected"})
"""Outcomes of tasks that may never have started: with a zero duration, no duration is
recorded for them (no empty or misleading run-time series)."""


class TaskRecord(NamedTuple):
    """What happened to one task that was added. Exactly one per task.

    Immutable (a named tuple: three times cheaper to build than a frozen dataclass,
    and one is built per task on the hot path).
    """

    name: str
    """Bounded task name (``module.qualname`` or ``__other__``)."""
    outcome: Outcome
    sync: bool
    """Ran (or would have run) in the threadpool."""
    duration: float
    """Seconds the task ran (0 if it never started)."""
    wait: float | None
    """Seconds from the response being sent (the tasks starting) to this task's start."""
    thread_wait: float | None = None
    """Sync tasks: seconds spent waiting for a free worker thread."""
    error_type: str | None = None
    """Exception class name for ``failure`` and ``cancelled``."""
    error_message: str | None = None
    """Truncated, redacted exception message."""
    trace_id: str | None = None
    span_id: str | None = None
    loop_busy: float = 0.0
    """Async tasks: seconds the task's steps held the event loop."""
    loop_blocks: int = 0
    """Async tasks: steps longer than the block threshold."""
    reason: str | None = None
    """Why a ``skipped``/``abandoned`` task did not run (default: an earlier one failed)."""
    hung_reported: bool = False
    """The task ran past ``hung_after`` and was reported as hung (``task.hung``)."""


@dataclass(frozen=True, slots=True)
class BlockRecord:
    """One step of an async task that held the event loop past the threshold."""

    task: str
    duration: float
    """Seconds the step held the loop (so far, if ``ongoing``)."""
    location: str
    """``file:line`` of the blocking code (best available)."""
    stack: tuple[str, ...]
    """Innermost frames, ``file:line in function``, outermost first."""
    sampled: bool
    """True if the location comes from a stack sampled during the block."""
    ongoing: bool
    """Reported by the watchdog while the loop was still blocked."""
    trace_id: str | None = None
    span_id: str | None = None


@dataclass(frozen=True, slots=True)
class HungRecord:
    """A task still running past ``hung_after``, and where it is waiting."""

    task: str
    age: float
    """Seconds the task has been running."""
    location: str
    """``file:line`` where it waits: the innermost app frame (of a pending child, if it
    waits on children)."""
    stack: tuple[str, ...]
    """Where it waits, innermost first: ``file:line in function`` per ``await`` (or per
    frame of a worker thread), library frames collapsed, pending children indented."""
    sync: bool
    """A sync task (its worker thread's stack), else an async one (its await chain)."""
    report: int
    """The back-off step this report is for: 1 at ``hung_after``, 2 at the next due age, and
    so on (a check that comes late reports once, for the latest step passed)."""
    trace_id: str | None = None
    span_id: str | None = None
