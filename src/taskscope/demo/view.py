"""What the demo shows: a live rich view on a terminal, plain text elsewhere."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from taskscope.demo.fit import plural, table, wrap
from taskscope.demo.stats import Histo

if TYPE_CHECKING:
    from taskscope.demo.load import LoadStats
    from taskscope.demo.stats import Block, DemoEvents, TaskStats, Window

DEMO_MODULE = "taskscope.demo.app."


def short(name: str) -> str:
    """Task names without the demo module, which every demo task shares."""
    return name.removeprefix(DEMO_MODULE)


def seconds(value: float | None) -> str:
    """Human units with three significant digits: ``850 µs``, ``31.8 ms``, ``1.24 s``."""
    if value is None:
        return "-"
    if value <= 0:
        return "0 ms"
    if value < 0.000_999_5:
        return f"{value * 1e6:.3g} µs"
    if value < 0.999_5:
        return f"{value * 1000:.3g} ms"
    return f"{value:.3g} s" if value < 100 else f"{value:.0f} s"


def quantile(histo: Histo, q: float) -> str:
    """A quantile estimated from buckets; in the lowest bucket only its bound is known."""
    value = histo.quantile(q)
    if histo.below_first_bucket(value):
        return f"< {seconds(histo.bounds[0])}"
    return seconds(value)


def where(location: str) -> str:
    """A ``file:line`` relative to the working directory when it is below it."""
    try:
        relative = os.path.relpath(location)
    except ValueError:
        return location
    return location if relative.startswith("..") else relative


def failures(task: TaskStats) -> str:
    items = sorted(task.failures.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{kind} {count:.0f}" for kind, count in items) or "-"


@dataclass
class Frame:
    """Everything one rendering needs."""

    title: str
    window: Window
    events: DemoEvents
    load: LoadStats | None
    metrics_url: str
    found: list[str]
    """Plain-language findings over the whole run so far."""
    footer: str = ""
    otlp: str = ""
    """OTLP export status, when it is on."""


ROW_HEADERS = (
    "task", "runs/s", "p50", "p95", "p99", "wait p95", "thread wait p95",
    "failed (by error type)", "skipped", "running",
)  # fmt: skip


def row(task: TaskStats, *, rate: bool = True) -> tuple[str, ...]:
    return (
        short(task.name),
        f"{task.rate:.1f}" if rate else f"{task.finished:.0f}",
        quantile(task.duration, 0.5),
        quantile(task.duration, 0.95),
        quantile(task.duration, 0.99),
        quantile(task.wait, 0.95),
        quantile(task.thread_wait, 0.95) if task.thread_wait.count else "-",
        failures(task),
        f"{task.outcomes.get('skipped', 0):.0f}",
        f"{task.in_progress:.0f}",
    )


def loop_line(window: Window) -> str:
    lag = window.lag
    top = lag.highest()
    return (
        f"event loop lag: p50 {quantile(lag, 0.5)}, p99 {quantile(lag, 0.99)}, "
        f"max ≤ {seconds(top)}; "
        f"{window.block_seconds.count:.0f} blocking steps (≥ threshold)"
    )


def load_line(load: LoadStats | None) -> str:
    if load is None:
        return "load: off (--no-load): send requests yourself"
    line = (
        f"load: {load.sent} requests sent, {load.errors} failed, {load.dropped} not sent "
        f"(concurrency cap); response time p50 {seconds(load.latency(0.5))}, "
        f"p99 {seconds(load.latency(0.99))}"
    )
    return f"{line}; last error: {load.last_error}" if load.last_error else line


def findings(window: Window, events: DemoEvents, threads: int) -> list[str]:
    """Plain-language statements of what taskscope saw, one per kind of trouble."""
    lines: list[str] = []
    for task in window.tasks:
        name = short(task.name)
        if task.failures:
            total = sum(task.failures.values())
            lines.append(f"FAILED   {name}: {plural(total, 'failure')} ({failures(task)})")
        skipped = task.outcomes.get("skipped", 0)
        if skipped:
            lines.append(
                f"SKIPPED  {name}: {plural(skipped, 'time')}, because an earlier task of "
                "the same response failed"
            )
        for outcome in ("cancelled", "abandoned"):
            if count := task.outcomes.get(outcome, 0):
                lines.append(
                    f"{outcome.upper():<8} {name}: {count:.0f} (still running at shutdown)"
                )
        if task.thread_wait.count and (p95 := task.thread_wait.quantile(0.95) or 0) >= 0.01:
            lines.append(
                f"THREADS  {name}: waited for a worker thread (p95 {seconds(p95)}; "
                f"the demo has {threads} threads)"
            )
    for task_name, (age, location) in sorted(events.hung.items()):
        lines.append(
            f"HUNG     {short(task_name)}: still running after {seconds(age)}, "
            f"waiting at {where(location)}"
        )
    for task_name, location, count, mean in events.block_sites():
        lines.append(
            f"BLOCKED  {short(task_name)}: held the event loop {plural(count, 'time')} "
            f"({seconds(mean)} on average) at {where(location)}"
        )
    return lines


def block_lines(blocks: list[Block]) -> list[str]:
    return [f"{seconds(b.duration):>7}  {short(b.task)}  at {where(b.location)}" for b in blocks]


# -- plain text ------------------------------------------------------------------------
def plain(frame: Frame, *, final: bool = False, width: int | None = None) -> str:
    """The frame as text, fitted to ``width`` columns (None: no limit): the table splits
    into column groups, long lines wrap."""
    rate = not final
    headers = ROW_HEADERS if rate else ("task", "runs", *ROW_HEADERS[2:])
    rows = [headers, *(row(task, rate=rate) for task in frame.window.tasks)]
    out = [frame.title]
    out.extend(table(rows, width))
    out.extend(wrap(loop_line(frame.window), width))
    out.extend(wrap(load_line(frame.load), width))
    if frame.otlp:
        out.extend(wrap(frame.otlp, width))
    blocks = frame.events.latest_blocks(3)
    if blocks and not final:
        out.append("  latest loop blocks:")
        for line in block_lines(blocks):
            out.extend(wrap(line, width, indent="    "))
    out.append("what taskscope found" + (":" if final else " so far:"))
    for line in frame.found or ["nothing unusual"]:
        out.extend(wrap(line, width, hang="         "))  # under the text after "FAILED   "
    for line in frame.footer.splitlines():
        out.extend(wrap(line, width, indent=""))
    return "\n".join(out)


# -- rich ------------------------------------------------------------------------------
RICH_HEADERS = (
    "task", "runs/s", "p50\nms", "p95\nms", "p99\nms", "wait\np95\nms", "thread\nwait\nms",
    "failed", "skip", "in\nflight",
)  # fmt: skip


def task_cells(task: TaskStats) -> list[str]:
    """One task's row: name, rate, duration p50/p95/p99, wait and thread wait p95, failed,
    skipped, running (the live table and the compact one show the same numbers)."""
    return [
        short(task.name),
        f"{task.rate:.1f}",
        ms(task.duration, 0.5),
        ms(task.duration, 0.95),
        ms(task.duration, 0.99),
        ms(task.wait, 0.95),
        ms(task.thread_wait, 0.95) if task.thread_wait.count else "-",
        f"{sum(task.failures.values()):.0f}",
        f"{task.outcomes.get('skipped', 0):.0f}",
        f"{task.in_progress:.0f}",
    ]


def ms(histo: Histo, q: float) -> str:
    """A quantile in milliseconds, compact (the live table's unit is in its header)."""
    value = histo.quantile(q)
    if value is None:
        return "-"
    if histo.below_first_bucket(value):
        return f"<{histo.bounds[0] * 1000:g}"
    value *= 1000
    return f"{value:.2g}" if value < 10 else f"{value:.0f}"


FULL_VIEW_LINES = 40
"""Terminals shorter than this get the compact view (80x24 fits it whole)."""


def rich_view(frame: Frame, width: int | None = None, height: int | None = None) -> Any:
    """The live view; on a terminal of fewer than ``FULL_VIEW_LINES`` lines, the compact
    one, which fits ``width`` x ``height`` (an 80x24 terminal shows all of it)."""
    if height is not None and height < FULL_VIEW_LINES:
        from taskscope.demo.compact import compact_view

        return compact_view(frame, width or 80, height)
    return _full_view(frame)


def _full_view(frame: Frame) -> Any:
    from rich import box
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    table = Table(
        title=frame.title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1),
        collapse_padding=True, pad_edge=False, title_style="bold",
    )  # fmt: skip
    table.add_column(RICH_HEADERS[0], overflow="fold", min_width=16)  # the one that gives way
    for header in RICH_HEADERS[1:]:
        table.add_column(header, justify="right", no_wrap=True)
    failed_rows: list[tuple[str, str, str]] = []
    for task in frame.window.tasks:
        failed = sum(task.failures.values())
        cells = task_cells(task)
        styles = [""] * len(cells)
        if failed:
            styles[7] = "bold red"
            failed_rows.extend(
                (short(task.name), kind, f"{count:.0f}") for kind, count in task.failures.items()
            )
        if task.outcomes.get("skipped"):
            styles[8] = "yellow"
        if task.loop_blocks:
            styles[0] = "magenta"
        if task.thread_wait.count and (task.thread_wait.quantile(0.95) or 0) >= 0.01:
            styles[6] = "yellow"
        table.add_row(*(Text(c, style=s) for c, s in zip(cells, styles, strict=True)))
    if not frame.window.tasks:
        table.add_row("no background task has run yet", *[""] * (len(RICH_HEADERS) - 1))

    errors = Table(box=None, padding=(0, 1), pad_edge=False, show_header=False)
    errors.add_column(no_wrap=True)
    errors.add_column(style="red", no_wrap=True)
    errors.add_column(justify="right")
    for failed_row in failed_rows:
        errors.add_row(*failed_row)
    if not failed_rows:
        errors.add_row("no failures", "", "")

    blocks = Table(box=None, padding=(0, 1), pad_edge=False, show_header=False)
    blocks.add_column(justify="right", no_wrap=True)
    blocks.add_column(style="magenta", no_wrap=True)
    blocks.add_column(overflow="fold")
    latest = frame.events.latest_blocks(3)
    for block in latest:
        blocks.add_row(seconds(block.duration), short(block.task), where(block.location))
    if not latest:
        blocks.add_row("", "no loop blocks yet", "")

    title = frame.title.split(" (", 1)[-1].rstrip(")")
    parts: list[Any] = [
        table,
        Panel(errors, title=f"failures by error type ({title})", title_align="left"),
        Panel(
            Group(Text(loop_line(frame.window)), blocks),
            title="event loop (latest blocks: duration, task, where)",
            title_align="left",
        ),
        Panel(
            Text("\n".join(frame.found or ["nothing unusual yet"])),
            title="what taskscope found so far",
            title_align="left",
        ),
        Text(load_line(frame.load), style="dim"),
    ]
    if frame.otlp:
        parts.append(Text(frame.otlp, style="dim"))
    parts.append(Text(f"metrics: {frame.metrics_url} · {frame.footer}", style="dim"))
    return Group(*parts)
