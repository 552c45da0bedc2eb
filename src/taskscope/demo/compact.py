"""The live view for an ordinary terminal (80x24 and up to ``FULL_VIEW_LINES`` lines):
one line per task and per statement, no boxes, sized to the terminal."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from taskscope.demo.fit import wrap
from taskscope.demo.view import block_lines, load_line, loop_line, task_cells

if TYPE_CHECKING:
    from taskscope.demo.stats import TaskStats
    from taskscope.demo.view import Frame

COMPACT_HEADERS = ("task", "/s", "p50", "p95", "p99", "wait", "thread", "fail", "skip", "run")


def _styles(task: TaskStats) -> list[str]:
    styles = [""] * len(COMPACT_HEADERS)
    if task.failures:
        styles[7] = "bold red"
    if task.outcomes.get("skipped"):
        styles[8] = "yellow"
    if task.loop_blocks:
        styles[0] = "magenta"
    if task.thread_wait.count and (task.thread_wait.quantile(0.95) or 0) >= 0.01:
        styles[6] = "yellow"
    return styles


def compact_view(frame: Frame, width: int, height: int) -> Any:
    """One line per task and per statement, no boxes; what does not fit is counted, not cut."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    def line(text: str, style: str = "") -> Text:
        return Text(text, style=style, no_wrap=True, overflow="ellipsis")

    table = Table(
        title=f"{frame.title} · times in ms (wait, thread: p95)",
        title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True,
        pad_edge=False, title_style="bold", show_edge=False,
    )  # fmt: skip
    table.add_column(COMPACT_HEADERS[0], no_wrap=True, overflow="ellipsis", ratio=1)
    for header in COMPACT_HEADERS[1:]:
        table.add_column(header, justify="right", no_wrap=True)
    for task in frame.window.tasks:
        cells = task_cells(task)
        table.add_row(*(Text(c, style=s) for c, s in zip(cells, _styles(task), strict=True)))
    if not frame.window.tasks:
        table.add_row("no background task has run yet", *[""] * (len(COMPACT_HEADERS) - 1))

    tail = [line(load_line(frame.load), "dim")]
    if frame.otlp:
        tail.append(line(frame.otlp, "dim"))
    tail.append(line(f"metrics: {frame.metrics_url} · {frame.footer}", "dim"))
    found = frame.found or ["nothing unusual yet"]
    latest = frame.events.latest_blocks(3)
    # title, header, rule, rows; loop line; "found" heading; the tail; one spare line
    fixed = 3 + max(1, len(frame.window.tasks)) + 1 + 1 + len(tail) + 1
    room = max(0, height - fixed)
    wrapped = [part for f in found for part in wrap(f, width - 1, hang="         ")]
    if len(wrapped) <= room:  # whole statements, wrapped under their text
        found_lines = wrapped
    else:  # one line each, as many as fit, and how many more there are
        found_lines = ["  " + f for f in found[: max(0, room - 1)]]
        if len(found) > len(found_lines):
            more = len(found) - len(found_lines)
            found_lines.append(f"  ... and {more} more (a taller terminal shows them)")
    room -= len(found_lines)
    parts: list[Any] = [table, line(loop_line(frame.window))]
    parts.extend(line("  " + b, "magenta") for b in block_lines(latest[: max(0, room)]))
    parts.append(line("what taskscope found so far:", "bold"))
    parts.extend(line(f) for f in found_lines)
    parts.extend(tail)
    return Group(*parts)
