"""prometheus_client multiprocess mode: drop the live gauges of processes that died."""

from __future__ import annotations

import os
from pathlib import Path


def clean_dead_processes(directory: str | None = None) -> list[int]:
    """Mark every process with live-gauge files in ``directory`` that no longer runs as
    dead (its ``taskscope_tasks_in_progress`` contribution goes). Returns their pids.

    ``directory`` defaults to ``PROMETHEUS_MULTIPROC_DIR``; a no-op when it is unset.
    A pool process killed by a hard time limit, ``revoke(terminate=True)`` or the OOM
    killer never decrements its gauge; its pid file would keep it at +1.
    """
    found = directory if directory is not None else os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not found:
        return []
    from prometheus_client import multiprocess

    dead: list[int] = []
    for path in Path(found).glob("gauge_live*_*.db"):
        try:
            pid = int(path.stem.rsplit("_", 1)[1])
        except (IndexError, ValueError):
            continue
        if pid not in dead and not _alive(pid):
            dead.append(pid)
    for pid in dead:
        multiprocess.mark_process_dead(pid, found)  # type: ignore[no-untyped-call]
    return dead


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
