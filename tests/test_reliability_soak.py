"""Soak: a real uvicorn process under steady mixed load for about a minute.

Memory, threads, file descriptors and the number of series must stay flat once warm, and
every task added must end in exactly one outcome. ``TS_SOAK_SECONDS`` changes the length.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskscope._record import OUTSIDE_TASKS
from taskscope._signals._buckets import BLOCK_SECONDS
from tests.reliability.harness import lag_ms, mb, paced, report, running, settled

WINDOW = 10.0  # seconds per sample
RATE = 80.0  # requests per second
SECONDS = float(os.environ.get("TS_SOAK_SECONDS", "60"))
PATHS = [
    "/work?n=5&fail_every=10",
    "/stream?chunks=3",
    *(f"/names?first={first}&count=5" for first in range(0, 300, 5)),
    "/work?n=5&fail_every=0",
]


@pytest.mark.slow
def test_soak_memory_threads_fds_series_flat(tmp_path: Path) -> None:
    """~60 s of mixed tasks (async, sync, failing, streaming, 300 names) with scrapes."""
    samples: list[dict[str, Any]] = []
    windows = max(3, int(SECONDS / WINDOW))
    with running(tmp_path, env={"TS_METRICS": "1"}) as server:
        for window in range(windows):
            server.stats(reset=True)
            result = paced(server.base, PATHS, RATE, int(RATE * WINDOW))
            assert set(result.statuses) == {200}
            assert httpx.get(f"{server.base}/metrics", timeout=10).status_code == 200
            stats = settled(server)
            samples.append(stats)
            report(
                f"soak/window-{window}",
                rss_mb=mb(stats["rss"]),
                threads=len(stats["threads"]),
                fds=stats["fds"],
                series=stats["series"],
                stalled=stats["stalled"],
                lag_ms=lag_ms(stats),
                added=stats["added"],
            )
    final = samples[-1]
    assert sum(final["outcomes"].values()) == final["added"]
    warm, last = samples[1], samples[-1]
    assert last["rss"] - warm["rss"] < 16 * 2**20
    for sample in samples:  # idle anyio workers come and go; the bound is what matters
        assert len(sample["threads"]) <= 40 + 2
        assert set(sample["threads"]) <= {
            "MainThread",
            "AnyIO worker thread",
            "taskscope-loop-watchdog",
        }
    assert last["fds"] <= warm["fds"] + 5
    # Flat once warm, but for the series a label's first loop stall creates (a shared CI
    # machine can stall the loop in any window): one stall histogram per task name, and
    # for "outside tasks" its counter too. Bounded by the task names, so not a leak.
    assert last["series"] - last["stall_series"] == warm["series"] - warm["stall_series"]
    assert set(last["stalled"]) <= {*last["task_names"], OUTSIDE_TASKS}
    histogram = len(BLOCK_SECONDS) + 3  # the buckets, +Inf, _count and _sum
    outside = OUTSIDE_TASKS in last["stalled"]
    assert last["stall_series"] == len(last["stalled"]) * histogram + outside
    report(
        "soak/summary",
        seconds=windows * WINDOW,
        added=final["added"],
        outcomes=final["outcomes"],
        rss_mb={"warm": mb(warm["rss"]), "end": mb(last["rss"])},
        threads={"warm": len(warm["threads"]), "end": len(last["threads"])},
        fds={"warm": warm["fds"], "end": last["fds"]},
        series={"warm": warm["series"], "end": last["series"]},
    )
