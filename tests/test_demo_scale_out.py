"""``taskscope demo --scale-out``: the report task runs in a real Celery worker."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.prometheus_server import wait_for
from tests.queue_services import redis_binary

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
REPORT = "taskscope.demo.app.render_report"


def _successes(url: str) -> float:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "taskscope_tasks_total" and sample.labels == {
                "task": REPORT,
                "outcome": "success",
            }:
                return float(sample.value)
    return 0.0


def test_scale_out_runs_reports_in_a_worker() -> None:
    """The web app publishes the reports; the worker it started records their runs."""
    redis_binary()  # skip (or fail on CI) without redis-server
    command = [sys.executable, "-m", "taskscope", "demo", "--scale-out"]
    command += ["--duration", "8", "--port", "0", "--rate", "5", "--interval", "4"]
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    lines: list[str] = []
    url = ""
    try:
        for line in process.stdout:
            lines.append(line)
            if "worker metrics: " in line:
                url = line.rsplit("worker metrics: ", 1)[1].strip()
                break
        assert url, "".join(lines)
        wait_for(lambda: _successes(url) > 0, timeout=20, what="reports run by the worker")
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = "".join(lines) + rest
    assert process.returncode == 0, output
    assert f"publish:{REPORT}" in output  # the web side only publishes
    assert "\n  render_report " not in output


def test_scale_out_without_redis_says_how_to_get_it() -> None:
    """No redis-server on PATH: exit 1 with the ways to get one."""
    result = subprocess.run(
        [sys.executable, "-m", "taskscope", "demo", "--scale-out", "--port", "0"],
        cwd=ROOT,
        env={**os.environ, "PATH": "/nonexistent"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "apt-get install redis-server" in result.stderr
    assert "--broker" in result.stderr
