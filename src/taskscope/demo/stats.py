"""Numbers for the view: the Prometheus registry (as a scrape reads it) and a sink."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from taskscope import Sink

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from taskscope import BlockRecord, HungRecord

Labels = tuple[tuple[str, str], ...]
HISTOGRAMS = (
    "taskscope_task_duration_seconds",
    "taskscope_task_wait_seconds",
    "taskscope_task_thread_wait_seconds",
    "taskscope_event_loop_lag_seconds",
    "taskscope_task_loop_block_seconds",
)


@dataclass
class Histo:
    """One histogram series: cumulative bucket counts (``le`` ascending), count, sum."""

    bounds: list[float] = field(default_factory=list)
    cumulative: list[float] = field(default_factory=list)
    count: float = 0.0
    total: float = 0.0

    def minus(self, earlier: Histo | None) -> Histo:
        if earlier is None or earlier.bounds != self.bounds:
            return self
        return Histo(
            list(self.bounds),
            [a - b for a, b in zip(self.cumulative, earlier.cumulative, strict=True)],
            self.count - earlier.count,
            self.total - earlier.total,
        )

    def plus(self, other: Histo) -> Histo:
        if not self.bounds:
            return other
        return Histo(
            list(self.bounds),
            [a + b for a, b in zip(self.cumulative, other.cumulative, strict=True)],
            self.count + other.count,
            self.total + other.total,
        )

    def quantile(self, q: float) -> float | None:
        """``histogram_quantile`` as Prometheus computes it (linear within a bucket)."""
        if self.count <= 0 or not self.bounds:
            return None
        rank = q * self.count
        previous_bound, previous_count = 0.0, 0.0
        for bound, cumulative in zip(self.bounds, self.cumulative, strict=True):
            if cumulative >= rank:
                if math.isinf(bound):
                    return previous_bound  # beyond the last finite bucket
                in_bucket = cumulative - previous_count
                if in_bucket <= 0:
                    return bound
                return (
                    previous_bound + (bound - previous_bound) * (rank - previous_count) / in_bucket
                )
            previous_bound, previous_count = bound, cumulative
        return previous_bound

    def below_first_bucket(self, value: float | None) -> bool:
        """True if ``value`` lies in the lowest bucket (all one can say: below its bound)."""
        return value is not None and bool(self.bounds) and 0 < value <= self.bounds[0]

    def highest(self) -> float | None:
        """Upper bound of the highest non-empty bucket (a ceiling for the maximum)."""
        previous = 0.0
        top: float | None = None
        for bound, cumulative in zip(self.bounds, self.cumulative, strict=True):
            if cumulative > previous:
                top = bound
            previous = cumulative
        return top


@dataclass
class Snapshot:
    """Every taskscope sample of a registry at one moment."""

    at: float
    counters: dict[tuple[str, Labels], float] = field(default_factory=dict)
    gauges: dict[tuple[str, Labels], float] = field(default_factory=dict)
    histograms: dict[tuple[str, Labels], Histo] = field(default_factory=dict)

    def tasks(self) -> set[str]:
        names = set()
        for _, labels in [*self.counters, *self.histograms, *self.gauges]:
            for key, value in labels:
                if key == "task":
                    names.add(value)
        return names


def take_snapshot(registry: CollectorRegistry, now: float | None = None) -> Snapshot:
    snap = Snapshot(time.monotonic() if now is None else now)
    for family in registry.collect():
        if not family.name.startswith("taskscope_"):
            continue
        if family.type == "histogram":
            series: dict[Labels, Histo] = {}
            for sample in family.samples:
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
                histo = series.setdefault(labels, Histo())
                if sample.name.endswith("_bucket"):
                    histo.bounds.append(float(sample.labels["le"]))
                    histo.cumulative.append(sample.value)
                elif sample.name.endswith("_count"):
                    histo.count = sample.value
                elif sample.name.endswith("_sum"):
                    histo.total = sample.value
            for labels, histo in series.items():
                snap.histograms[(family.name, labels)] = histo
        elif family.type == "counter":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    labels = tuple(sorted(sample.labels.items()))
                    snap.counters[(sample.name, labels)] = sample.value
        elif family.type == "gauge":
            for sample in family.samples:
                snap.gauges[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return snap


@dataclass
class TaskStats:
    """One task's numbers over a window (or the whole run)."""

    name: str
    outcomes: dict[str, float]
    failures: dict[str, float]
    duration: Histo
    wait: Histo
    thread_wait: Histo
    in_progress: float
    loop_blocks: float
    seconds: float

    @property
    def finished(self) -> float:
        return sum(v for k, v in self.outcomes.items() if k != "skipped")

    @property
    def rate(self) -> float:
        return self.finished / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Window:
    """Differences between two snapshots."""

    seconds: float
    tasks: list[TaskStats]
    lag: Histo
    block_seconds: Histo


def window(current: Snapshot, earlier: Snapshot | None) -> Window:
    """Per-task numbers between ``earlier`` (None: process start) and ``current``."""
    seconds = current.at - earlier.at if earlier is not None else 0.0

    def counter(name: str, labels: Labels) -> float:
        now = current.counters.get((name, labels), 0.0)
        before = earlier.counters.get((name, labels), 0.0) if earlier else 0.0
        return now - before

    def histo(name: str, task: str | None, **match: str) -> Histo:
        result = Histo()
        for (family, labels), value in current.histograms.items():
            found = dict(labels)
            if family != name or (task is not None and found.get("task") != task):
                continue
            if any(found.get(k) != v for k, v in match.items()):
                continue
            before = earlier.histograms.get((family, labels)) if earlier else None
            result = result.plus(value.minus(before))
        return result

    tasks = []
    for name in sorted(current.tasks()):
        outcomes: dict[str, float] = {}
        failures: dict[str, float] = {}
        for metric, labels in current.counters:
            found = dict(labels)
            if found.get("task") != name:
                continue
            if metric == "taskscope_tasks_total":
                outcomes[found["outcome"]] = counter(metric, labels)
            elif metric == "taskscope_task_failures_total":
                failures[found["error_type"]] = counter(metric, labels)
        tasks.append(
            TaskStats(
                name=name,
                # taskscope creates every outcome at 0 for the alert rules: keep what happened.
                outcomes={k: v for k, v in outcomes.items() if v > 0},
                failures={k: v for k, v in failures.items() if v > 0},
                duration=histo("taskscope_task_duration_seconds", name),
                wait=histo("taskscope_task_wait_seconds", name),
                thread_wait=histo("taskscope_task_thread_wait_seconds", name),
                in_progress=current.gauges.get(
                    ("taskscope_tasks_in_progress", (("task", name),)), 0.0
                ),
                loop_blocks=counter("taskscope_task_loop_blocks_total", (("task", name),)),
                seconds=seconds,
            )
        )
    return Window(
        seconds,
        tasks,
        histo("taskscope_event_loop_lag_seconds", None),
        histo("taskscope_task_loop_block_seconds", None),
    )


@dataclass(frozen=True)
class Block:
    """One finished loop stall, as taskscope's sink interface reports it."""

    at: float
    task: str
    duration: float
    location: str


class DemoEvents(Sink):
    """The demo's sink (``Telemetry(sinks=[...])``): keeps the latest loop stalls, the places
    that stall and the hung tasks, from the records taskscope hands every sink (called
    from the watchdog thread; a lock keeps the view's reads consistent)."""

    def __init__(self, keep: int = 50) -> None:
        self.blocks: deque[Block] = deque(maxlen=keep)
        self.block_sites_seen: dict[tuple[str, str], tuple[int, float]] = {}
        self.hung: dict[str, tuple[float, str]] = {}
        """Latest hung report per task: (seconds running, where it waits)."""
        self._lock = threading.Lock()

    def block_ended(self, block: BlockRecord) -> None:
        finished = Block(time.monotonic(), block.task, block.duration, block.location)
        with self._lock:
            self.blocks.append(finished)
            key = (finished.task, finished.location)
            count, seconds = self.block_sites_seen.get(key, (0, 0.0))
            self.block_sites_seen[key] = (count + 1, seconds + finished.duration)

    def hung_detected(self, hung: HungRecord) -> None:
        with self._lock:
            self.hung[hung.task] = (hung.age, hung.location)

    def latest_blocks(self, n: int) -> list[Block]:
        with self._lock:
            return list(self.blocks)[-n:][::-1]

    def block_sites(self) -> list[tuple[str, str, int, float]]:
        """``(task, location, count, mean seconds)`` per place that blocked, most first."""
        with self._lock:
            items = list(self.block_sites_seen.items())
        sites = [(t, loc, n, seconds / n) for (t, loc), (n, seconds) in items]
        return sorted(sites, key=lambda site: -site[2])


class QuietLogger:
    """The demo's ``Telemetry(logger=...)``: the live view shows what the log events say
    (its data comes from the registry and :class:`DemoEvents`), so they are not printed
    over it."""

    def _drop(self, event: str, **fields: Any) -> None:
        return

    debug = info = warning = error = exception = _drop
