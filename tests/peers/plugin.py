"""pytest plugin loaded into FastAPI's and Starlette's own test suites (``-p``).

``TASKSCOPE_PEER_MODE`` says how taskscope is switched on, as a user would:

- ``off``: not at all (the baseline);
- ``dropin``: ``from taskscope import BackgroundTasks`` instead of FastAPI's name (the
  suite's ``from fastapi import BackgroundTasks`` gets taskscope's class);
- ``instrument-before`` / ``instrument-after``: ``taskscope.instrument()`` before or after
  FastAPI is imported (the ``opentelemetry-instrument`` case is "before"); "after" with
  metrics-only settings (``span_mode="off"``), so the suite also runs through the batched
  hot path, the other modes through the per-task path with spans;
- ``instrument``: ``taskscope.instrument()`` with metrics-only settings (Starlette);
- ``replace``: Starlette's ``BackgroundTask(s)`` names replaced by taskscope's.

Each process writes what it saw to ``TASKSCOPE_PEER_OUT``: the controller the failed test
ids and counts, every process the task outcomes taskscope recorded (so a run that never
went through taskscope is caught, not counted as a pass).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

MODE = os.environ.get("TASKSCOPE_PEER_MODE", "off")
OUT = Path(os.environ.get("TASKSCOPE_PEER_OUT", "."))


def _switch_on(mode: str) -> None:
    if mode == "off":
        return
    if mode == "instrument-before":
        if "fastapi" in sys.modules:
            msg = "instrument-before: fastapi was imported before the plugin"
            raise RuntimeError(msg)
        import taskscope

        taskscope.instrument()
        return
    if mode == "instrument-after":
        import fastapi  # imported first on purpose

        import taskscope

        taskscope.instrument(taskscope.Telemetry(span_mode="off"))
        return
    if mode == "instrument":
        import taskscope

        taskscope.instrument(taskscope.Telemetry(span_mode="off"))
        return
    if mode == "dropin":
        import fastapi

        import taskscope

        fastapi.BackgroundTasks = taskscope.BackgroundTasks  # type: ignore[misc,assignment]
        return
    if mode == "replace":
        import starlette.background

        import taskscope

        starlette.background.BackgroundTask = taskscope.BackgroundTask  # type: ignore[misc]
        starlette.background.BackgroundTasks = taskscope.BackgroundTasks  # type: ignore[misc]
        return
    msg = f"unknown TASKSCOPE_PEER_MODE {mode!r}"
    raise ValueError(msg)


_switch_on(MODE)
_failed: set[str] = set()
_counts = {"passed": 0, "skipped": 0}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        _failed.add(report.nodeid)
    elif report.when == "call" and report.passed:
        _counts["passed"] += 1
    elif report.skipped:
        _counts["skipped"] += 1


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _failed.add(f"collect:{report.nodeid}")


def _recorded_outcomes() -> dict[str, float]:
    """The outcomes taskscope recorded in this process (its default telemetry)."""
    if MODE == "off":
        return {}
    from prometheus_client import REGISTRY

    outcomes: dict[str, float] = {}
    for metric in REGISTRY.collect():
        if metric.name != "taskscope_tasks":
            continue
        for sample in metric.samples:
            if sample.name == "taskscope_tasks_total":
                key = sample.labels["outcome"]
                outcomes[key] = outcomes.get(key, 0.0) + sample.value
    return outcomes


def pytest_sessionfinish(session: pytest.Session) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    worker = getattr(session.config, "workerinput", None)
    name = worker["workerid"] if worker else "main"
    (OUT / f"records-{name}.json").write_text(json.dumps(_recorded_outcomes()))
    if worker is None:  # the controller (or a run without xdist) sees every report
        result: dict[str, Any] = {**_counts, "mode": MODE, "failed": sorted(_failed)}
        (OUT / "result.json").write_text(json.dumps(result, indent=1))
