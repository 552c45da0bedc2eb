"""``taskscope demo``: one command, and every kind of trouble shows up, correctly attributed."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from taskscope import BlockRecord, HungRecord, Telemetry
from taskscope.__main__ import main
from taskscope._record import TaskRecord
from taskscope._runtime import runtime_of
from taskscope._signals.prometheus import metrics_for
from taskscope.demo import app as demo_app
from taskscope.demo.stats import DemoEvents, Histo, take_snapshot, window
from taskscope.testing import ListLogger
from tests.otlp_receiver import OtlpReceiver, attributes

pytestmark = pytest.mark.slow

APP_FILE = Path(demo_app.__file__).resolve()


def marker_line(marker: str) -> int:
    """The line number of the demo app's source line carrying ``marker``."""
    lines = APP_FILE.read_text().splitlines()
    found = [i for i, line in enumerate(lines, start=1) if marker in line]
    assert len(found) == 1, found
    return found[0]


def demo_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def section(output: str, start: str) -> str:
    assert start in output, output
    return output[output.index(start) :]


def unwrapped(text: str) -> str:
    """The demo wraps long entries at 80 columns (continuation lines aligned under the
    entry's text, 9 columns in): one line per entry, so a path or a list is matched
    whatever its length."""
    lines: list[str] = []
    indent = 0
    for line in text.splitlines():
        depth = len(line) - len(line.lstrip())
        if lines and line.strip() and depth >= indent + 6 and lines[-1].strip():
            lines[-1] += " " + line.strip()
            continue
        lines.append(line)
        indent = depth
    return "\n".join(lines)


def test_final_summary_attributes_each_kind_of_trouble(tmp_path: Path) -> None:
    """A 6 s run names the failing, skipped, thread-starved and loop-blocking tasks correctly."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "taskscope",
            "demo",
            "--duration",
            "6",
            "--port",
            "0",
            "--rate",
            "30",
            "--svg",
            "view.svg",
        ],
        capture_output=True,
        text=True,
        timeout=40,
        cwd=tmp_path,
        env=demo_env(),
        check=False,
    )
    output = result.stdout
    assert result.returncode == 0, output + result.stderr
    assert re.search(r"metrics: http://127\.0\.0\.1:\d+/metrics", output)
    assert "docker compose -f deploy/docker-compose.yml up" in output
    assert "background tasks (last" in output  # a periodic summary before the end
    svg = (tmp_path / "view.svg").read_text()  # --svg: the live view, drawn by rich
    assert svg.startswith("<svg")
    assert "resize_thumbnail" in svg
    summary = section(output, "taskscope demo: final summary (finished after")
    found = unwrapped(section(summary, "what taskscope found:"))

    # Blocking: the async task, at the exact line of the sync call inside it. (On a starved
    # machine another task's step can truly hold the loop too; it must not take the blame.)
    blocked = re.findall(
        r"BLOCKED  (\S+): held the event loop (\d+) times \((\S+) ms on average\) at (\S+):(\d+)",
        found,
    )
    assert blocked, found
    task, count, mean, path, line = blocked[0]  # the most frequent site comes first
    assert task == "resize_thumbnail", found
    assert int(count) >= 3
    assert 140 <= float(mean) < 400  # time.sleep(0.15)
    assert (tmp_path / path).resolve() == APP_FILE
    assert int(line) == marker_line("BLOCKS THE EVENT LOOP")
    others = [b for b in blocked[1:] if b[0] != "resize_thumbnail"]
    assert all(int(line) != int(b[4]) for b in others), found
    assert sum(int(b[1]) for b in others) < int(count), found

    # Failures: only the e-mail task, by exception class.
    failed = re.findall(r"FAILED   (\S+): (\d+) failures \((.*)\)", found)
    assert [f[0] for f in failed] == ["send_notification_email"], found
    failures = int(failed[0][1])
    kinds = dict(re.findall(r"(\w+Error) (\d+)", failed[0][2]))
    assert set(kinds) == {"ConnectionError", "TimeoutError"}, failed
    assert sum(int(n) for n in kinds.values()) == failures

    # Skipped: the log line added after the e-mail, exactly once per failed e-mail.
    skipped = re.findall(r"SKIPPED  (\S+): (\d+) times", found)
    assert skipped == [("write_log", str(failures))], found

    # Threadpool: the burst of slow sync reports waits for the demo's 4 worker threads.
    threads = re.findall(
        r"THREADS  (\S+): waited for a worker thread \(p95 ([\d.]+) (ms|s);", found
    )
    assert "render_report" in [t[0] for t in threads], found
    _, value, unit = next(t for t in threads if t[0] == "render_report")
    assert float(value) * (1 if unit == "s" else 0.001) >= 0.1

    # Hung: the order task waits on a dead upstream, reported with the line it waits at.
    hung = re.findall(r"HUNG     (\S+): still running after (\S+) s, waiting at (\S+):(\d+)", found)
    assert [h[0] for h in hung] == ["sync_with_partner"], found
    _, age, path, line = hung[0]
    assert float(age) >= demo_app.DEMO_HUNG_AFTER
    assert (tmp_path / path).resolve() == APP_FILE
    assert int(line) == marker_line("HANGS")

    report_row = next(line for line in summary.splitlines() if "  render_report " in line)
    assert report_row.split()[1].isdigit()  # runs
    assert "hidden by the demo: " + str(failures) in summary


def _read_lines(stream: object, into: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.put(line)


@pytest.mark.parametrize(
    ("stop", "how"),
    [(signal.SIGINT, "stopped by Ctrl-C"), (signal.SIGTERM, "stopped by SIGTERM")],
)
def test_no_load_serves_metrics_and_stops_on_a_signal(
    tmp_path: Path, stop: signal.Signals, how: str
) -> None:
    """``--no-load``: the app serves requests and /metrics; Ctrl-C or SIGTERM prints the
    summary and exits 0."""
    process = subprocess.Popen(
        [sys.executable, "-m", "taskscope", "demo", "--no-load", "--duration", "0", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env=demo_env(),
    )
    lines: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None
    reader = threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True)
    reader.start()
    try:
        url = None
        deadline = time.monotonic() + 20
        seen = []
        while url is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            seen.append(line)
            match = re.search(r"serving (http://127\.0\.0\.1:\d+)", line)
            url = match.group(1) if match else None
        assert url is not None, "".join(seen)
        with httpx.Client(base_url=url, timeout=10) as client:
            for _ in range(3):
                response = client.post("/send-notification/ada@example.com", params={"q": "x"})
                assert response.status_code == 200
            metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert 'task="taskscope.demo.app.write_log"' in metrics.text
        process.send_signal(stop)
        process.wait(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=5)
        process.stdout.close()
    output = "".join(seen)
    while not lines.empty():
        output += lines.get()
    assert process.returncode == 0, output
    summary = section(output, f"taskscope demo: final summary ({how}")
    assert "load: off (--no-load)" in summary
    assert "Traceback" not in output
    row = next(line for line in summary.splitlines() if "  write_log " in line)
    assert int(row.split()[1]) >= 3  # the three dependency log lines (and more) ran


def test_otlp_endpoint_gets_the_task_spans_and_metrics(tmp_path: Path) -> None:
    """With ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, task spans and metrics reach the collector."""
    with OtlpReceiver() as receiver:
        env = demo_env()
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
        env["OTEL_METRIC_EXPORT_INTERVAL"] = "1000"
        result = subprocess.run(
            [sys.executable, "-m", "taskscope", "demo", "--duration=3", "--port=0", "--rate=10"],
            capture_output=True,
            text=True,
            timeout=40,
            cwd=tmp_path,
            env=env,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"OTLP to {receiver.endpoint}: 0 failed exports" in result.stdout
        spans = [span for _, span in receiver.spans()]
        points = receiver.metric_points("taskscope.tasks")
    names = {span.name for span in spans}
    assert "background_task taskscope.demo.app.resize_thumbnail" in names
    failed = [
        span
        for span in spans
        if attributes(span.attributes).get("taskscope.task.outcome") == "failure"
    ]
    assert failed
    assert {attributes(s.attributes)["error.type"] for s in failed} <= {
        "ConnectionError",
        "TimeoutError",
    }
    blocked = [event for span in spans for event in span.events if event.name == "loop.blocked"]
    line = marker_line("BLOCKS THE EVENT LOOP")
    assert any(
        str(attributes(e.attributes)["code.file.path"]).endswith("app.py")
        and attributes(e.attributes)["code.line.number"] == line
        for e in blocked
    )
    assert points


def test_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """``taskscope demo --help`` documents every flag; no command prints the usage."""
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--duration", "--port", "--host", "--rate", "--no-load", "--interval", "--svg"):
        assert flag in text
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_quantiles_follow_prometheus_interpolation() -> None:
    """Bucket quantiles interpolate linearly inside a bucket, as ``histogram_quantile`` does."""
    histo = Histo([0.1, 0.2, float("inf")], [0.0, 10.0, 10.0], 10.0, 1.5)
    assert histo.quantile(0.5) == pytest.approx(0.15)
    assert histo.quantile(1.0) == pytest.approx(0.2)
    assert histo.highest() == 0.2
    assert Histo().quantile(0.5) is None


def test_demo_events_count_each_finished_block_once() -> None:
    """Through the runtime, as the watchdog reports them: a stall reported while ongoing
    counts once, when it ends; one seen only when it ended counts too; hangs are kept."""
    events = DemoEvents()
    telemetry = Telemetry(
        registry=CollectorRegistry(), logger=ListLogger(), sinks=[events], span_mode="off"
    )
    runtime = runtime_of(telemetry)

    def block(duration: float, *, ongoing: bool) -> BlockRecord:
        return BlockRecord("t", duration, "a.py:1", (), sampled=True, ongoing=ongoing)

    runtime.block_detected(block(0.12, ongoing=True))
    runtime.block_ended(block(0.3, ongoing=False), reported=True)
    runtime.block_ended(block(0.1, ongoing=False), reported=False)
    runtime.hung_detected(HungRecord("u", 61.0, "b.py:2", (), sync=False, report=1))
    [(task, location, count, mean)] = events.block_sites()
    assert (task, location, count) == ("t", "a.py:1", 2)
    assert mean == pytest.approx(0.2)
    assert [b.duration for b in events.latest_blocks(5)] == [0.1, 0.3]
    assert events.hung == {"u": (61.0, "b.py:2")}
    assert runtime.batching  # a sink that keeps no records leaves the batched path on


def test_window_reads_outcomes_failures_and_quantiles_from_the_registry() -> None:
    """Per-task numbers between two snapshots come from taskscope's own metric families."""
    registry = CollectorRegistry()
    metrics = metrics_for(registry)
    metrics.record(TaskRecord("app.old", "success", False, 0.2, 0.0))
    before = take_snapshot(registry, now=10.0)
    for _ in range(3):
        metrics.record(TaskRecord("app.send", "failure", False, 0.02, 0.001, error_type="OSError"))
    metrics.record(TaskRecord("app.log", "skipped", True, 0.0, None))
    metrics.record(TaskRecord("app.log", "success", True, 0.3, 0.01, thread_wait=0.2))
    after = take_snapshot(registry, now=12.0)
    tasks = {task.name: task for task in window(after, before).tasks}
    assert tasks["app.send"].failures == {"OSError": 3}
    assert tasks["app.send"].rate == pytest.approx(1.5)
    assert tasks["app.log"].outcomes == {"skipped": 1, "success": 1}
    assert 0.1 < (tasks["app.log"].thread_wait.quantile(0.95) or 0) <= 0.25
    assert tasks["app.old"].finished == 0  # before the window
