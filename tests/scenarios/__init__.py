"""Background tasks that block (or do not block) the event loop, with marked lines.

A line ending in ``# BLOCK: <name>`` is where the loop probe must blame the block named
``<name>``; :func:`markers` finds it, so the tests never hard-code line numbers.
"""

from __future__ import annotations

from pathlib import Path


def markers(module_file: str, name: str) -> set[str]:
    """``file:line`` of every line ending in ``# BLOCK: name`` in ``module_file``."""
    path = Path(module_file).resolve()
    found = {
        f"{path}:{number}"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if line.rstrip().endswith(f"# BLOCK: {name}")
    }
    if not found:
        msg = f"no '# BLOCK: {name}' in {path}"
        raise LookupError(msg)
    return found
