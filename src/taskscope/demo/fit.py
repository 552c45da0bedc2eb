"""Fitting the demo's text into a terminal: tables split by columns, lines wrapped."""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
from collections.abc import Sequence


def terminal_width() -> int | None:
    """Columns of the terminal the demo prints to; None (no limit) when stdout is not a
    terminal and ``COLUMNS`` is not set (a log file or a pipe keeps whole lines)."""
    if "COLUMNS" in os.environ or sys.stdout.isatty():
        return max(40, shutil.get_terminal_size().columns)
    return None


def plural(count: float, word: str) -> str:
    """``1 time``, ``3 times``, ``1 failure``."""
    return f"{count:.0f} {word}" if round(count) == 1 else f"{count:.0f} {word}s"


def table(rows: Sequence[Sequence[str]], width: int | None, indent: str = "  ") -> list[str]:
    """Rows (the first one the header) as aligned text; when wider than ``width``, split
    into several tables by columns, each repeating the first (the task name)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    groups: list[list[int]] = [[]]
    used = len(indent) + widths[0]
    for i in range(1, len(widths)):
        if width is not None and groups[-1] and used + 2 + widths[i] > width:
            groups.append([])
            used = len(indent) + widths[0]
        groups[-1].append(i)
        used += 2 + widths[i]
    lines: list[str] = []
    for number, group in enumerate(groups):
        if number:
            lines.append("")
        for r in rows:
            cells = [r[0].ljust(widths[0]), *(r[i].ljust(widths[i]) for i in group)]
            lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def wrap(line: str, width: int | None, indent: str = "  ", hang: str = "    ") -> list[str]:
    """One logical line, wrapped at ``width`` with a hanging indent (unchanged if None)."""
    if width is None or len(indent) + len(line) <= width:
        return [indent + line]
    return textwrap.wrap(
        line,
        width,
        initial_indent=indent,
        subsequent_indent=indent + hang,
        break_long_words=False,
        break_on_hyphens=False,
    )
