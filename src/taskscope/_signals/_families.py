"""The metric catalogue: every metric of taskscope, described once.

Drives the Prometheus collector (single process), prometheus_client's objects
(multiprocess), the OpenTelemetry instruments, the OTLP exporter's bucket views, and the
tests that hold the README's table and the dashboard to it.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from taskscope._record import OUTSIDE_TASKS
from taskscope._signals._buckets import BLOCK_SECONDS, LAG_SECONDS, TASK_SECONDS

ZEROED_OUTCOMES = ("success", "failure", "cancelled", "skipped", "abandoned")
"""The outcomes created at 0 with a task name: those of in-process tasks. The queue-only
ones (``retry``, ``revoked``, ``rejected``) appear with their first occurrence, so a web
app does not carry three empty series per task name."""
WARNING_KINDS = ("coroutine_not_awaited", "too_many_tasks")
"""Every ``kind`` of ``taskscope_task_warnings_total``."""


class FamilySpec(NamedTuple):
    attribute: str
    """Attribute name on the metrics objects."""
    kind: Literal["counter", "histogram", "gauge"]
    name: str
    """Family name (counters without ``_total``, as prometheus_client expects)."""
    documentation: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()
    otel_name: str = ""
    """The OpenTelemetry instrument's name (dotted; the unit carries seconds)."""
    otel_unit: str = "s"
    """UCUM unit of the OpenTelemetry instrument (``s``, or ``{task}``-style counts)."""
    multiprocess_mode: Literal["livesum", "livemax"] = "livesum"
    """Gauges: how prometheus_client merges the processes' values."""

    @property
    def exposed_name(self) -> str:
        """The name in an exposition (counters get ``_total``)."""
        return f"{self.name}_total" if self.kind == "counter" else self.name


FAMILIES = (
    FamilySpec(
        "tasks", "counter", "taskscope_tasks",
        "Background tasks by final outcome (every task added ends in exactly one).",
        ("task", "outcome"),
        otel_name="taskscope.tasks", otel_unit="{task}",
    ),
    FamilySpec(
        "failures", "counter", "taskscope_task_failures",
        "Background task failures by exception class.",
        ("task", "error_type"),
        otel_name="taskscope.task.failures", otel_unit="{task}",
    ),
    FamilySpec(
        "duration", "histogram", "taskscope_task_duration_seconds",
        "Run time of background tasks.",
        ("task", "outcome"), TASK_SECONDS,
        otel_name="taskscope.task.duration", otel_unit="s",
    ),
    FamilySpec(
        "wait", "histogram", "taskscope_task_wait_seconds",
        "Time from the response being sent to the task starting (head-of-line wait).",
        ("task",), TASK_SECONDS,
        otel_name="taskscope.task.wait", otel_unit="s",
    ),
    FamilySpec(
        "thread_wait", "histogram", "taskscope_task_thread_wait_seconds",
        "Time sync tasks waited for a free worker thread (threadpool pressure).",
        ("task",), TASK_SECONDS,
        otel_name="taskscope.task.thread_wait", otel_unit="s",
    ),
    FamilySpec(
        "in_progress", "gauge", "taskscope_tasks_in_progress",
        "Background tasks running now.",
        ("task",),
        otel_name="taskscope.tasks.in_progress", otel_unit="{task}",
    ),
    FamilySpec(
        "oldest_running", "gauge", "taskscope_task_oldest_running_seconds",
        "Age of the oldest running task of each name (0: none running); hung tasks show here.",
        ("task",), multiprocess_mode="livemax",
        otel_name="taskscope.task.oldest_running", otel_unit="s",
    ),
    FamilySpec(
        "loop_lag", "histogram", "taskscope_event_loop_lag_seconds",
        "How late the event loop's heartbeat fired.",
        (), LAG_SECONDS,
        otel_name="taskscope.event_loop.lag", otel_unit="s",
    ),
    FamilySpec(
        "loop_blocks", "counter", "taskscope_task_loop_blocks",
        "Event-loop stalls longer than the threshold, by the task blamed (or outside tasks).",
        ("task",),
        otel_name="taskscope.task.loop_blocks", otel_unit="{step}",
    ),
    FamilySpec(
        "loop_block_seconds", "histogram", "taskscope_task_loop_block_seconds",
        "Duration of the event-loop stalls, measured by the loop heartbeat.",
        ("task",), BLOCK_SECONDS,
        otel_name="taskscope.task.loop_block", otel_unit="s",
    ),
    FamilySpec(
        "loop_busy", "counter", "taskscope_task_loop_busy_seconds",
        "Seconds async tasks held the event loop (sampled estimate).",
        ("task",),
        otel_name="taskscope.task.loop_busy", otel_unit="s",
    ),
    FamilySpec(
        "warnings", "counter", "taskscope_task_warnings",
        "Misuse flagged by taskscope (e.g. a sync task returning a coroutine).",
        ("task", "kind"),
        otel_name="taskscope.task.warnings", otel_unit="{warning}",
    ),
    FamilySpec(
        "instrumentation_errors", "counter", "taskscope_instrumentation_errors",
        "Errors inside taskscope's own instrumentation, absorbed so tasks are not lost.",
        ("signal",),
        otel_name="taskscope.instrumentation.errors", otel_unit="{error}",
    ),
)  # fmt: skip


METRIC_NAMES = tuple(spec.exposed_name for spec in FAMILIES)
"""Every metric name as scraped."""
OTEL_NAMES = {spec.exposed_name: spec.otel_name for spec in FAMILIES}
"""Prometheus name -> OpenTelemetry instrument name."""


def zero_series(name: str) -> list[tuple[str, tuple[str, ...]]]:
    """(family attribute, label values) of the counter series the alert rules read, which
    are created at 0 when a task name is first seen.

    A series that appears with the value 1 has no increase for ``rate()``/``increase()``
    to see: without these zeros the first skip, loop block or misuse of a task (and the
    first failure, for the failure-ratio alert) would never fire an alert.
    """
    if name == OUTSIDE_TASKS:  # not a task: only the stalls' counter
        return [("loop_blocks", (name,))]
    return [
        *(("tasks", (name, outcome)) for outcome in ZEROED_OUTCOMES),
        ("loop_blocks", (name,)),
        *(("warnings", (name, kind)) for kind in WARNING_KINDS),
    ]
