"""Detection latency of the watchdog: from the start of a blocking call to its log event.

A background task calls ``time.sleep(0.3)`` on the loop (block threshold 0.1 s); a second
series spins in pure Python for 0.3 s instead (holds the GIL, released only at the
interpreter's switch interval). The
logger records when ``task.loop_blocked`` with ``ongoing=True`` arrives (from the watchdog
thread, while the loop is still blocked). Latency = that moment - the moment the blocking
call started. Ideal: the threshold plus at most one watchdog poll. Target: <= 150 ms.

    .venv/bin/python bench/detection_latency.py [--quick] [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from prometheus_client import CollectorRegistry

from common import median, print_environment, table, verdict

THRESHOLD = 0.1
BLOCK = 0.3
TARGET_MS = 150.0


class TimingLogger:
    """A structlog-compatible logger that notes when each event arrived."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, dict[str, Any]]] = []

    def _log(self, event: str, **kw: Any) -> None:
        self.events.append((time.perf_counter(), event, kw))

    info = warning = error = _log


def _spin(seconds: float) -> None:
    """Pure-Python busy loop: holds the GIL except at the interpreter's switch interval."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def one_run(kind: str) -> float | None:
    """Latency in ms of one detection (None if the block was not reported while ongoing)."""
    from taskscope import BackgroundTasks, Telemetry

    logger = TimingLogger()
    telemetry = Telemetry(
        registry=CollectorRegistry(),
        span_mode="off",
        block_threshold=THRESHOLD,
        logger=logger,
    )
    started: list[float] = []

    async def blocker() -> None:
        started.append(time.perf_counter())
        if kind == "sleep":
            time.sleep(BLOCK)  # the blocking call under test
        else:
            _spin(BLOCK)

    async def scenario() -> None:
        warm = BackgroundTasks(telemetry=telemetry)
        warm.add_task(asyncio.sleep, 0)
        await warm()  # starts the probe and its watchdog
        await asyncio.sleep(0.05)
        tasks = BackgroundTasks(telemetry=telemetry)
        tasks.add_task(blocker)
        await tasks()

    asyncio.run(scenario())
    for at, event, kw in logger.events:
        if event == "task.loop_blocked" and kw.get("ongoing") is True:
            return (at - started[0]) * 1e3
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 runs")
    parser.add_argument("--runs", type=int, default=None)
    args = parser.parse_args()
    runs = args.runs or (5 if args.quick else 10)
    print_environment()
    print(
        f"# detection: {runs} runs per kind, a {BLOCK * 1e3:.0f} ms block in an async task, "
        f"threshold {THRESHOLD * 1e3:.0f} ms, asyncio"
    )
    text, checks = report(measure(runs))
    print(text)
    for label, value, ok in checks:
        print(f"{label}: {value} -> {verdict(ok)}")


def measure(runs: int) -> dict[str, list[float | None]]:
    results: dict[str, list[float | None]] = {"sleep": [], "spin": []}
    for _ in range(runs):  # interleaved
        for kind, latencies in results.items():
            latencies.append(one_run(kind))
    return results


def report(results: dict[str, list[float | None]]) -> tuple[str, list[tuple[str, str, bool]]]:
    rows = []
    checks = []
    for kind, latencies in results.items():
        found = [x for x in latencies if x is not None]
        worst = max(found) if found else float("nan")
        label = "time.sleep (GIL released)" if kind == "sleep" else "pure-Python spin (GIL held)"
        rows.append(
            [
                label,
                f"{len(found)}/{len(latencies)}",
                median(found),
                worst,
                min(found) if found else float("nan"),
            ]
        )
        ok = len(found) == len(latencies) and worst <= TARGET_MS
        checks.append((f"detection: {kind} max ms <= {TARGET_MS:.0f}", f"{worst:.0f}", ok))
    text = table(["blocking call", "detected while ongoing", "median ms", "max ms", "min ms"], rows)
    return text, checks


if __name__ == "__main__":
    main()
