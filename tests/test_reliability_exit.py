"""Interpreter exit and signals, in fresh interpreters (scripts in ``tests/reliability/``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.reliability.harness import ROOT, report


def _script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "tests" / "reliability" / name), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _line(output: str, prefix: str) -> dict[str, Any]:
    (line,) = [line for line in output.splitlines() if line.startswith(prefix)]
    result: dict[str, Any] = json.loads(line[len(prefix) :])
    return result


@pytest.mark.parametrize("late", [False, True], ids=["still-running", "ending-during-exit"])
def test_inflight_tasks_abandoned_at_exit_once(late: bool) -> None:
    """Tasks running (on the loop and in a worker thread) and queued at interpreter exit are
    recorded ``abandoned`` by the atexit hook with one ``taskscope.abandoned`` summary line;
    tasks that end during the exit are not counted a second time."""
    done = _script("atexit_check.py", *(["late"] if late else []))
    assert done.returncode == 0, done.stderr
    assert _line(done.stdout, "FINAL ") == {"abandoned": 4.0}
    summary = [line for line in done.stdout.splitlines() if "taskscope.abandoned" in line]
    assert len(summary) == 1
    assert "count=4" in summary[0]
    assert "task.abandoned" not in done.stdout  # no per-task line at exit
    report(
        f"exit/atexit-{'late' if late else 'running'}", outcomes={"abandoned": 4}, summary_lines=1
    )


def test_taskscope_installs_no_signal_handlers() -> None:
    """Importing and using all of taskscope (drop-in, instrument_app, loop probe, metrics
    server, OTLP with a dead collector) leaves every signal handler and the wakeup fd as is."""
    done = _script("signals_check.py")
    assert done.returncode == 0, done.stderr
    found = _line(done.stdout, "SIGNALS ")
    assert found["after"] == found["before"]
    assert found["wakeup_fd"] == [-1, -1]


FIRST_TASK = """
import json, sys, time
import anyio
from prometheus_client import CollectorRegistry
import taskscope
from taskscope import BackgroundTasks, Telemetry
before = set(sys.modules)

async def job() -> None:
    pass

def sync_job() -> None:
    pass

async def main() -> float:
    began = time.perf_counter()
    tasks = BackgroundTasks(telemetry=Telemetry(registry=CollectorRegistry()))
    tasks.add_task(job)
    tasks.add_task(sync_job)
    await tasks()
    return time.perf_counter() - began

seconds = anyio.run(main)
print("FIRST " + json.dumps({"new": sorted(set(sys.modules) - before), "seconds": seconds}))
"""


def test_first_task_imports_nothing_heavy_on_the_loop() -> None:
    """The first task of a process runs on the event loop: structlog (and rich, which it
    pulls in) are imported with taskscope, not then (that import held the loop ~50 ms)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", FIRST_TASK],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    found = _line(done.stdout, "FIRST ")
    new = [str(name) for name in found["new"]]
    heavy = [name for name in new if name.split(".")[0] in ("structlog", "rich")]
    assert heavy == []
    report(
        "first-task/imports",
        new_modules=len(new),
        first_task_ms=round(float(found["seconds"]) * 1e3, 1),
    )
