"""Fault matrix against real uvicorn processes: load, shutdown, disconnects, hostile names.

Each test starts ``tests/reliability/app.py`` under uvicorn on 127.0.0.1 (free port, always
killed), drives it with a bounded async client and reads the outcome counts from the app's
registry. Figures are printed (``pytest -s``) and appended to ``$TS_RELIABILITY_REPORT``.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from tests.reliability.harness import (
    Server,
    lag_ms,
    load,
    mb,
    report,
    running,
    settled,
    wait_for,
)

pytestmark = pytest.mark.slow  # real uvicorn processes: make test, not make check

TASKS = 10_000
PER_REQUEST = 8  # every 10th task fails: failures land at every position, so some skip
CONCURRENCY = 200


@pytest.mark.parametrize(
    ("continue_on_error", "fastapi"),
    [(False, False), (True, False), (False, True)],
    ids=["stop", "continue", "fastapi-stop"],
)
def test_healthy_baseline_every_task_accounted(
    tmp_path: Path, continue_on_error: bool, fastapi: bool
) -> None:
    """10,000 mixed tasks over 200 concurrent requests, 10% failing: counts exact (Starlette
    with explicit telemetry, and FastAPI's own BackgroundTasks with instrument_app)."""
    env = {
        "TS_CONTINUE_ON_ERROR": "1" if continue_on_error else "0",
        "TS_FASTAPI": "1" if fastapi else "0",
    }
    with running(tmp_path, env=env) as server:
        before = server.stats(reset=True)
        result = load(server.base, [f"/work?n={PER_REQUEST}"] * (TASKS // PER_REQUEST), CONCURRENCY)
        after = settled(server)
    assert result.statuses == {200: TASKS // PER_REQUEST}
    # A request retried because uvicorn closed a keep-alive connection after a failed task
    # may have run already: the app counts what it added; the accounting must match it.
    assert TASKS <= after["added"] <= TASKS + PER_REQUEST * result.retries
    assert after["outcomes"] == after["expected"]
    assert sum(after["outcomes"].values()) == after["added"]
    if continue_on_error:
        assert "skipped" not in after["outcomes"]
    else:
        assert after["outcomes"]["skipped"] > 0
    assert after["taskscope_lag"]["count"] > 0  # taskscope's own lag histogram is fed
    census = _thread_census(after["threads"])
    report(
        f"baseline/{'fastapi-' if fastapi else ''}{'continue' if continue_on_error else 'stop'}",
        outcomes=after["outcomes"],
        requests=result.requests,
        retries=result.retries,
        seconds=round(result.seconds, 2),
        latency_ms={
            "p50": round(result.quantile(0.5) * 1e3, 1),
            "p99": round(result.quantile(0.99) * 1e3, 1),
        },
        lag_ms=lag_ms(after),
        rss_mb={"before": mb(before["rss"]), "after": mb(after["rss"])},
        threads=dict(census),
        thread_wait_mean_ms=round(
            after["thread_wait"]["sum"] / after["thread_wait"]["count"] * 1e3, 2
        ),
    )


def _hold(server: Server, per_kind: int = 3, secs: float = 2.0, queued: int = 2) -> int:
    """Start ``per_kind`` async and sync long tasks, each with ``queued`` tasks behind it."""
    paths = [f"/hold?kind=async&secs={secs}&queued={queued}"] * per_kind
    paths += [f"/hold?kind=sync&secs={secs}&queued={queued}"] * per_kind
    load(server.base, paths, len(paths))

    def all_running() -> bool:
        started = server.stats()["started"]
        return bool(started.get("async", 0) == per_kind and started.get("sync", 0) == per_kind)

    wait_for(all_running, 10)
    return len(paths) * (1 + queued)


def _exit_figures(final: dict[str, Any]) -> dict[str, Any]:
    """Loop lag over the server's life and RSS at the end, from its final snapshot."""
    return {"lag_ms": lag_ms(final), "rss_mb_at_end": mb(final["rss"])}


def test_sigterm_default_waits_for_every_task(tmp_path: Path) -> None:
    """SIGTERM without a graceful timeout: uvicorn waits; every task succeeds."""
    with running(tmp_path) as server:
        added = _hold(server, secs=2.0)
        seconds = server.terminate(timeout=30)
    final = server.final_state("lifespan")
    assert final is not None
    assert final["added"] == added
    assert final["outcomes"] == {"success": added}
    assert 1.5 < seconds < 10
    report(
        "shutdown/sigterm-default",
        outcomes=final["outcomes"],
        **_exit_figures(final),
        shutdown_s=round(seconds, 2),
        returncode=server.process.returncode,
        atexit_ran=server.final_state("atexit") is not None,
    )


def test_sigterm_graceful_timeout_cancels_and_abandons(tmp_path: Path) -> None:
    """``--timeout-graceful-shutdown 1``: running tasks cancelled, queued ones abandoned."""
    with running(tmp_path, args=["--timeout-graceful-shutdown", "1"]) as server:
        added = _hold(server, secs=30.0)
        seconds = server.terminate(timeout=30)
    final = server.final_state("lifespan")
    assert final is not None
    assert final["added"] == added
    assert final["outcomes"] == {"cancelled": 6, "abandoned": added - 6}
    assert seconds < 5  # the 30 s tasks (3 of them in threads) do not hold the exit
    report(
        "shutdown/sigterm-timeout-1",
        outcomes=final["outcomes"],
        **_exit_figures(final),
        shutdown_s=round(seconds, 2),
        returncode=server.process.returncode,
    )


def test_sigint_twice_force_exit_accounted_at_exit(tmp_path: Path) -> None:
    """Ctrl-C twice (force exit, no lifespan shutdown): the atexit accounting is complete."""
    with running(tmp_path) as server:
        added = _hold(server, secs=2.0)
        began = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        server.process.send_signal(signal.SIGINT)
        server.process.wait(30)
        seconds = time.monotonic() - began
    final = server.final_state("atexit")
    assert final is not None
    assert final["added"] == added
    assert final["outcomes"] == {"cancelled": 6, "abandoned": added - 6}
    report(
        "shutdown/sigint-force-exit",
        outcomes=final["outcomes"],
        **_exit_figures(final),
        shutdown_s=round(seconds, 2),
        returncode=server.process.returncode,
        note="exit waits for running sync tasks: anyio worker threads are not daemons",
    )


def test_hard_exit_leaves_lost_tasks_visible_as_in_progress(tmp_path: Path) -> None:
    """Known limit: ``--lifespan off`` + graceful timeout, SIGTERM: uvicorn re-raises
    SIGTERM with the default action before the loop delivers the cancellations, so no
    outcome (and no atexit hook) can be recorded; the tasks stay visible as in progress."""
    multiproc = tmp_path / "multiproc"
    multiproc.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(multiproc)}
    args = ["--lifespan", "off", "--timeout-graceful-shutdown", "1"]
    with running(tmp_path, env=env, args=args) as server:
        added = _hold(server, secs=30.0)
        seconds = server.terminate(timeout=30)
    assert server.process.returncode == -signal.SIGTERM
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(multiproc))  # type: ignore[no-untyped-call]
    outcomes = 0.0
    in_progress = 0.0
    ended_running = 0.0  # outcomes of the 6 long tasks (none, while uvicorn behaves so)
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == "taskscope_tasks_total":
                outcomes += sample.value
                if "hold_" in sample.labels["task"]:
                    ended_running += sample.value
            elif sample.name == "taskscope_tasks_in_progress":
                in_progress += sample.value
    # Each running task is either recorded or visible as still in progress: never gone.
    assert in_progress + ended_running == 6
    report(
        "shutdown/sigterm-lifespan-off-timeout-1",
        added=added,
        recorded_outcomes=outcomes,
        in_progress_left=in_progress,
        shutdown_s=round(seconds, 2),
        returncode=server.process.returncode,
    )


@pytest.mark.parametrize("layers", [0, 3], ids=["plain", "basehttp-x3"])
def test_client_disconnects_tasks_still_accounted(tmp_path: Path, layers: int) -> None:
    """Clients that hang up after the headers or mid-stream (with and without three stacked
    ``BaseHTTPMiddleware``): every task still ends in exactly one outcome."""

    async def hang_up(base: str, count: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            for index in range(count):
                path = "/stream?chunks=50" if index % 2 else "/work?n=3&fail_every=0"
                async with client.stream("GET", path) as response:
                    assert response.status_code == 200
                    if index % 2:
                        async for _chunk in response.aiter_bytes():
                            break  # one chunk, then close mid-stream

    with running(tmp_path, env={"TS_BASEHTTP": str(layers)}) as server:
        before = server.stats(reset=True)
        asyncio.run(hang_up(server.base, 40))
        after = settled(server)
    assert sum(after["outcomes"].values()) == after["added"]
    # Starlette stops a streaming response whose client left: its task does not run.
    # Whatever the server does, each added task has exactly one outcome.
    report(
        f"disconnects/after-headers+mid-stream/{'basehttp-x3' if layers else 'plain'}",
        added=after["added"],
        outcomes=after["outcomes"],
        lag_ms=lag_ms(after),
        rss_mb={"before": mb(before["rss"]), "after": mb(after["rss"])},
    )


def _thread_census(threads: list[str]) -> Counter[str]:
    census = Counter(threads)
    assert set(census) <= {"MainThread", "AnyIO worker thread", "taskscope-loop-watchdog"}
    assert census["AnyIO worker thread"] <= 40  # anyio's default limiter
    assert census["taskscope-loop-watchdog"] <= 1  # one loop, one watchdog
    return census


def test_threadpool_saturation_reports_wait_takes_no_threads(tmp_path: Path) -> None:
    """80 sync tasks of 0.3 s at once on 40 worker threads: half wait for a thread, the wait
    is in ``taskscope_task_thread_wait_seconds``; taskscope adds only its one watchdog."""
    with running(tmp_path) as server:
        before = server.stats(reset=True)
        began = time.monotonic()
        load(server.base, ["/hold?kind=sync&secs=0.3&queued=0"] * 80, 80)
        after = settled(server)
        seconds = time.monotonic() - began
    census = _thread_census(after["threads"])
    assert after["outcomes"] == {"success": 80}
    wait = after["thread_wait"]
    assert wait["count"] == 80
    assert wait["sum"] >= 40 * 0.2  # the 40 that queued waited about one task's length
    report(
        "threadpool-saturation",
        outcomes=after["outcomes"],
        lag_ms=lag_ms(after),
        rss_mb={"before": mb(before["rss"]), "after": mb(after["rss"])},
        thread_wait_sum_s=round(wait["sum"], 2),
        thread_wait_mean_ms=round(wait["sum"] / wait["count"] * 1e3, 1),
        threads=dict(census),
        seconds=round(seconds, 2),
    )


def test_hostile_task_names_stay_bounded_and_metrics_fast(tmp_path: Path) -> None:
    """10,000 distinct task names: series capped (``__other__``), /metrics small and fast."""
    with running(tmp_path, env={"TS_METRICS": "1"}) as server:
        paths = [f"/names?first={first}&count=100" for first in range(0, 10_000, 100)]
        load(server.base, paths, 20)
        after = settled(server)
        server.stats(reset=True)
        timings = []
        for _ in range(5):
            began = time.perf_counter()
            response = httpx.get(f"{server.base}/metrics", timeout=10)
            timings.append(time.perf_counter() - began)
            assert response.status_code == 200
        text = response.text
        with httpx.stream(
            "GET", f"{server.base}/metrics", headers={"accept-encoding": "gzip"}
        ) as raw:
            gzipped = raw.headers.get("content-encoding") == "gzip"
            wire_bytes = sum(len(chunk) for chunk in raw.iter_raw())
        during = server.stats()  # loop lag while the six scrapes rendered (off the loop)
    assert after["added"] == 10_000
    assert after["outcomes"] == {"success": 10_000}
    assert after["distinct_tasks"] <= 500 + 1  # max_task_names + __other__
    assert 'task="__other__"' in text
    # Bounded by the cap, not by the names seen: about 7 KB of text per admitted name.
    assert len(text.encode()) < (500 + 1) * 8_000
    assert sorted(timings)[2] < 1.0
    report(
        "hostile/10k-task-names",
        distinct_task_labels=after["distinct_tasks"],
        series=after["series"],
        metrics_bytes=len(text.encode()),
        metrics_wire_bytes=wire_bytes,
        gzipped=gzipped,
        scrape_ms_median=round(sorted(timings)[2] * 1e3, 1),
        lag_ms_during_scrapes=lag_ms(during),
        rss_mb=mb(after["rss"]),
    )
