"""Interpreter exit and signals, in fresh interpreters (scripts in ``tests/reliability/``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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


def _line(output: str, prefix: str) -> dict[str, object]:
    (line,) = [line for line in output.splitlines() if line.startswith(prefix)]
    result: dict[str, object] = json.loads(line[len(prefix) :])
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
