"""The fast single-process metrics expose exactly what prometheus_client's objects would."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from taskscope._record import NOT_RUN_OUTCOMES, BlockRecord, TaskRecord
from taskscope._signals.prometheus import PrometheusMetrics
from taskscope._signals.prometheus_fast import FastMetrics

RECORDS = [
    TaskRecord("app.send", "success", False, 0.0042, 0.001, trace_id="ab" * 16, loop_busy=0.004),
    TaskRecord("app.send", "failure", False, 0.3, 0.0, error_type="OSError", loop_busy=0.3),
    TaskRecord("app.log", "skipped", True, 0.0, None),
    TaskRecord("app.log", "success", True, 1.0, 0.25, thread_wait=0.1),
    TaskRecord("app.log", "success", True, 0.1, 0.5, thread_wait=0.001),  # on a bucket bound
    TaskRecord("app.slow", "cancelled", False, 999.0, 0.0, error_type="CancelledError"),
    TaskRecord("app.gone", "abandoned", True, 0.0, None),
]
BLOCK = BlockRecord("app.send", 0.3, "app.py:3", ("app.py:3 in send",), True, False, "cd" * 16)


class _Running:
    """A runtime's tasks in flight, as FastMetrics reads them when scraped."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def running(self) -> tuple[dict[str, float], dict[str, int]]:
        counts: dict[str, int] = {}
        for name in self.names:
            counts[name] = counts.get(name, 0) + 1
        return dict.fromkeys(counts, 0.0), counts

    def oldest_running(self) -> dict[str, float]:
        return self.running()[0]


def _start(metrics: object, name: str, running: _Running) -> None:
    """A task starts: prometheus_client's gauge is moved; FastMetrics sees it at scrape."""
    if isinstance(metrics, FastMetrics):
        running.names.append(name)
        metrics.watch(running)
    else:
        metrics.task_started(name)  # type: ignore[attr-defined]


def _finish(metrics: object, name: str, running: _Running) -> None:
    if isinstance(metrics, FastMetrics):
        running.names.remove(name)
    else:
        metrics.task_finished(name)  # type: ignore[attr-defined]


def _feed(metrics: object, running: _Running | None = None) -> _Running:
    running = running or _Running()
    for record in RECORDS:
        ran = record.outcome not in NOT_RUN_OUTCOMES  # as the runtime: only a run starts
        if ran:
            _start(metrics, record.name, running)
        metrics.record(record)  # type: ignore[attr-defined]
        if ran:
            _finish(metrics, record.name, running)
    _start(metrics, "app.running", running)
    metrics.block_detected(BLOCK)  # type: ignore[attr-defined]
    metrics.block_ended(BLOCK)  # type: ignore[attr-defined]
    for lag in (0.0001, 0.02, 3.0):
        metrics.lag(lag)  # type: ignore[attr-defined]
    metrics.warning("app.send", "coroutine_not_awaited")  # type: ignore[attr-defined]
    metrics.instrumentation_error("logging")  # type: ignore[attr-defined]
    return running  # held by the caller: the metrics keep their sources weakly


def _without_created(text: bytes) -> list[str]:
    """Sample lines, minus prometheus_client's _created series and exemplar timestamps."""
    lines = []
    for line in text.decode().splitlines():
        if "_created" in line:
            continue
        if " # {" in line:  # exemplar: keep labels and value, drop the timestamp
            head, exemplar = line.split(" # ", 1)
            line = head + " # " + " ".join(exemplar.split(" ")[:2])
        lines.append(line)
    return sorted(lines)


def test_same_exposition_as_prometheus_client() -> None:
    """Text and OpenMetrics output are identical (samples, labels, buckets, exemplars)."""
    reference_registry, fast_registry = CollectorRegistry(), CollectorRegistry()
    _feed(PrometheusMetrics(reference_registry))
    running = _feed(FastMetrics(fast_registry))
    for render in (generate_latest, generate_openmetrics):
        assert _without_created(render(fast_registry)) == _without_created(
            render(reference_registry)
        )
    assert running.names == ["app.running"]  # held until here: sources are weak


def test_concurrent_updates_are_not_lost() -> None:
    """Records from several threads at once: every increment counted."""
    registry = CollectorRegistry()
    metrics = FastMetrics(registry)
    record = TaskRecord("app.t", "success", True, 0.01, 0.0)

    def hammer() -> None:
        for _ in range(5000):
            metrics.record(record)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    labels = {"task": "app.t", "outcome": "success"}
    assert registry.get_sample_value("taskscope_tasks_total", labels) == 20000
    assert registry.get_sample_value("taskscope_task_duration_seconds_count", labels) == 20000


def test_taken_names_are_refused() -> None:
    """Registering on a registry that already has taskscope's names raises (sink off)."""
    registry = CollectorRegistry()
    PrometheusMetrics(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        FastMetrics(registry)


@pytest.mark.parametrize("implementation", [PrometheusMetrics, FastMetrics])
def test_alerting_series_start_at_zero_for_a_new_task_name(implementation: type) -> None:
    """The first sight of a task name creates the counters the alert rules read at 0, so
    the first skip, failure, loop block or misuse is an increase (not a series born at 1)."""
    registry = CollectorRegistry()
    metrics = implementation(registry)
    running = _Running()
    _start(metrics, "app.send", running)
    value = registry.get_sample_value
    for outcome in ("success", "failure", "cancelled", "skipped", "abandoned"):
        assert value("taskscope_tasks_total", {"task": "app.send", "outcome": outcome}) == 0.0
    assert value("taskscope_task_loop_blocks_total", {"task": "app.send"}) == 0.0
    for kind in ("coroutine_not_awaited", "too_many_tasks"):
        assert value("taskscope_task_warnings_total", {"task": "app.send", "kind": kind}) == 0.0
    # A name first seen through a skip, a warning or a block gets the same zeros.
    metrics.record(TaskRecord("app.log", "skipped", True, 0.0, None))
    assert value("taskscope_tasks_total", {"task": "app.log", "outcome": "skipped"}) == 1.0
    assert value("taskscope_tasks_total", {"task": "app.log", "outcome": "failure"}) == 0.0
    metrics.warning("app.misused", "coroutine_not_awaited")
    assert value("taskscope_tasks_total", {"task": "app.misused", "outcome": "skipped"}) == 0.0
    metrics.block_detected(dataclasses.replace(BLOCK, task="app.blocker"))
    assert value("taskscope_task_loop_blocks_total", {"task": "app.blocker"}) == 1.0
    assert value("taskscope_tasks_total", {"task": "app.blocker", "outcome": "failure"}) == 0.0
    # Histograms are not pre-created: an empty one would make histogram_quantile NaN.
    assert (
        value("taskscope_task_duration_seconds_count", {"task": "app.send", "outcome": "success"})
        is None
    )


MULTIPROCESS_ZEROS = """
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from taskscope._signals.prometheus import metrics_for

metrics_for(CollectorRegistry()).task_started("app.send")  # this "worker" sees the name
merged = CollectorRegistry()  # what any worker's /metrics serves
MultiProcessCollector(merged)
print(generate_latest(merged).decode())
"""


def test_multiprocess_files_carry_the_zero_series(tmp_path: Path) -> None:
    """Under PROMETHEUS_MULTIPROC_DIR the zeros are written to the shared files, so every
    worker's /metrics exports them (also after the worker that saw the name exited)."""
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", MULTIPROCESS_ZEROS],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for outcome in ("success", "failure", "cancelled", "skipped", "abandoned"):
        assert f'taskscope_tasks_total{{outcome="{outcome}",task="app.send"}} 0.0' in result.stdout
    assert 'taskscope_task_loop_blocks_total{task="app.send"} 0.0' in result.stdout


def test_collection_builds_families_outside_the_lock() -> None:
    """Task records (on the event loop) never wait while a scrape builds metric objects:
    only the copy of one family's values happens under the lock."""
    registry = CollectorRegistry()
    metrics = FastMetrics(registry)
    running = _feed(metrics)
    held_while_building: list[bool] = []
    for family in metrics._families:
        build = family.family

        def spy(snapshot: object, build: object = build) -> object:
            held_while_building.append(metrics._lock.locked())
            return build(snapshot)  # type: ignore[operator]

        family.family = spy  # type: ignore[method-assign,assignment]
    families = list(metrics.collect())
    assert len(families) == len(metrics._families)
    assert held_while_building == [False] * len(families)
    assert running.names == ["app.running"]  # held until here: sources are weak


def test_a_record_between_two_families_is_not_lost() -> None:
    """Values recorded while a collection is half done appear in the next scrape."""
    registry = CollectorRegistry()
    metrics = FastMetrics(registry)
    collection = metrics.collect()
    next(collection)  # the first family (tasks) is built; the rest not yet
    metrics.record(RECORDS[0])
    rest = list(collection)
    duration = next(f for f in rest if f.name == "taskscope_task_duration_seconds")
    assert any(s.name.endswith("_count") and s.value == 1.0 for s in duration.samples)
    value = registry.get_sample_value(
        "taskscope_tasks_total", {"task": "app.send", "outcome": "success"}
    )
    assert value == 1.0
