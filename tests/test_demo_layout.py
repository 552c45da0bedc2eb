"""The demo fits a normal terminal: the live view at 80x24, the summary at 80 and 120
columns, with the wording a person would write ("1 time", not "1 times")."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from prometheus_client import CollectorRegistry
from rich.console import Console

from taskscope import __version__
from taskscope._record import BlockRecord, Outcome, TaskRecord
from taskscope._signals.prometheus import metrics_for
from taskscope.demo.fit import plural, table, wrap
from taskscope.demo.load import LoadStats
from taskscope.demo.stats import DemoEvents, take_snapshot, window
from taskscope.demo.view import FULL_VIEW_LINES, Frame, findings, plain, rich_view

APP = "taskscope.demo.app."
LOCATION = "/home/someone/projects/shop/src/taskscope/demo/app.py:66"


def demo_like_frame(*, blocks: int = 3, title: str = "background tasks") -> Frame:
    """A frame with what the demo shows after a while: four tasks, two error types,
    skips, thread waits and loop blocks."""
    registry = CollectorRegistry()
    metrics = metrics_for(registry)
    before = take_snapshot(registry, now=0.0)
    for i in range(180):
        error = ("ConnectionError", "TimeoutError")[i // 4 % 2] if i % 4 == 0 else None
        outcome: Outcome = "failure" if error else "success"
        metrics.record(
            TaskRecord(
                APP + "send_notification_email", outcome, False, 0.03, 0.01, error_type=error
            )
        )
        if error:
            metrics.record(TaskRecord(APP + "write_log", "skipped", True, 0.0, None))
        else:
            metrics.record(TaskRecord(APP + "write_log", "success", True, 0.001, 0.09, 0.06))
    for _ in range(18):
        metrics.record(TaskRecord(APP + "render_report", "success", True, 0.6, 0.0, 0.46))
    for _ in range(6):
        metrics.record(TaskRecord(APP + "resize_thumbnail", "success", False, 0.17, 0.0))
    after = take_snapshot(registry, now=6.0)
    events = DemoEvents()
    for _ in range(blocks):
        events.block_ended(
            BlockRecord(APP + "resize_thumbnail", 0.152, LOCATION, (), sampled=True, ongoing=False)
        )
    win = window(after, before)
    load = LoadStats(sent=204)
    return Frame(
        title=title,
        window=win,
        events=events,
        load=load,
        metrics_url="http://127.0.0.1:8000/metrics",
        found=findings(win, events, 4),
        footer="54 s left; Ctrl-C to stop",
    )


def rendered(frame: Frame, width: int, height: int) -> list[str]:
    console = Console(width=width, height=height, file=io.StringIO(), record=True)
    console.print(rich_view(frame, width, height))
    return console.export_text().rstrip("\n").split("\n")


@pytest.mark.parametrize(("width", "height"), [(80, 24), (100, 30), (120, 39)])
def test_live_view_fits_the_terminal(width: int, height: int) -> None:
    """Every line of the live view is on screen: no bottom panel cut off, nothing wider."""
    lines = rendered(demo_like_frame(), width, height)
    assert len(lines) < height, "\n".join(lines)  # the cursor line stays free
    assert max(len(line) for line in lines) <= width
    text = "\n".join(lines)
    for task in ("send_notification_email", "write_log", "render_report", "resize_thumbnail"):
        assert task in text
    assert "what taskscope found so far:" in text
    assert "BLOCKED  resize_thumbnail" in text
    assert text.rstrip().endswith("Ctrl-C to stop")  # the last line is there


def test_live_view_counts_what_does_not_fit() -> None:
    """On a very short terminal the findings that do not fit are counted, not lost silently."""
    lines = rendered(demo_like_frame(), 80, 16)
    assert len(lines) < 16, "\n".join(lines)
    assert any("more (a taller terminal shows them)" in line for line in lines)


def test_a_tall_terminal_gets_the_full_view() -> None:
    """With room to spare, the boxed view with the failures by error type."""
    lines = rendered(demo_like_frame(), 120, FULL_VIEW_LINES + 10)
    assert any("failures by error type" in line for line in lines)


@pytest.mark.parametrize("width", [80, 120])
def test_final_summary_fits_the_width(width: int) -> None:
    """The summary's table splits into column groups and long lines wrap under their text."""
    frame = demo_like_frame(title="taskscope demo: final summary (finished after 6.1 s)")
    frame.footer = (
        "(quantiles are estimated from the histogram buckets, as histogram_quantile() does)\n"
        "metrics were at http://127.0.0.1:8000/metrics; the tutorial's log file: /tmp/x.txt"
    )
    text = plain(frame, final=True, width=width)
    assert max(len(line) for line in text.splitlines()) <= width, text
    for header in ("runs", "p99", "thread wait p95", "failed (by error type)", "running"):
        assert header in text
    assert "ConnectionError 23, TimeoutError 22" in text
    unwrapped = plain(frame, final=True)
    assert max(len(line) for line in unwrapped.splitlines()) > 120  # nothing to fit: one line


def test_counts_read_as_words() -> None:
    """ "1 time", "2 times", "1 failure": no "1 times"."""
    assert plural(1, "time") == "1 time"
    assert plural(2, "time") == "2 times"
    assert plural(1.0, "failure") == "1 failure"
    frame = demo_like_frame(blocks=1)
    assert "held the event loop 1 time (" in "\n".join(frame.found)


def test_table_and_wrap_helpers() -> None:
    """Columns move to a second table (repeating the first) only when the width is full."""
    rows = [("task", "aaaa", "bbbb"), ("t", "1", "2")]
    assert table(rows, None) == ["  task  aaaa  bbbb", "  t     1     2"]
    assert table(rows, 14) == ["  task  aaaa", "  t     1", "", "  task  bbbb", "  t     2"]
    assert wrap("one two three", 10, indent="", hang="  ") == ["one two", "  three"]


def test_version_flag() -> None:
    """``taskscope --version`` prints the installed version."""
    result = subprocess.run(
        [sys.executable, "-m", "taskscope", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"taskscope {__version__}"
