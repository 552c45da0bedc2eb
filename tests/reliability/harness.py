"""Run the reliability app under a real uvicorn process and drive it with a bounded client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.reliability.app:app"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """One uvicorn process on 127.0.0.1; always terminated by :func:`running`."""

    port: int
    process: subprocess.Popen[bytes]
    log: Path
    final: Path
    exit_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self, *, reset: bool = False) -> dict[str, Any]:
        url = f"{self.base}/stats" + ("?reset=1" if reset else "")
        response = httpx.get(url, timeout=10)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def terminate(self, timeout: float = 30.0) -> float:
        """SIGTERM, wait for the exit; returns seconds taken (kills after ``timeout``)."""
        began = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.exit_seconds = time.monotonic() - began
        return self.exit_seconds

    def final_state(self, tag: str) -> dict[str, Any] | None:
        path = Path(f"{self.final}.{tag}.json")
        if not path.exists():
            return None
        result: dict[str, Any] = json.loads(path.read_text())
        return result

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def running(
    tmp_path: Path,
    *,
    env: dict[str, str] | None = None,
    args: Sequence[str] = (),
    name: str = "app",
    ready_timeout: float = 20.0,
    gunicorn: bool = False,
) -> Iterator[Server]:
    """Start ``uvicorn tests.reliability.app:app`` (or gunicorn with ``args`` before the
    app, e.g. ``-w 2 -k uvicorn_worker.UvicornWorker``) and yield once it answers."""
    port = free_port()
    log = tmp_path / f"{name}.log"
    final = tmp_path / f"{name}.final"
    environment = {
        **os.environ,
        "TS_FINAL": str(final),
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        APP,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
        *args,
    ]
    if gunicorn:
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "-b",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
            "--control-socket",
            str(tmp_path / "gunicorn.ctl"),
            *args,
            APP,
        ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, env=environment, stdout=out, stderr=subprocess.STDOUT
        )
    server = Server(port, process, log, final)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                msg = f"uvicorn exited with {process.returncode}:\n{server.log_text()[-3000:]}"
                raise RuntimeError(msg)
            try:
                if httpx.get(f"{server.base}/stats", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                msg = f"uvicorn did not start:\n{server.log_text()[-3000:]}"
                raise RuntimeError(msg)
            time.sleep(0.05)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@dataclass
class LoadResult:
    requests: int
    statuses: Counter[int]
    latencies: list[float]
    seconds: float
    retries: int = 0

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _load(base: str, paths: Sequence[str], concurrency: int) -> LoadResult:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    retries = [0]
    queue: asyncio.Queue[str] = asyncio.Queue()
    for path in paths:
        queue.put_nowait(path)

    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=10) as client:

        async def worker() -> None:
            while True:
                try:
                    path = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                began = time.perf_counter()
                for attempt in range(10):
                    try:
                        response = await client.get(path)
                        break
                    except httpx.TransportError:
                        # A task that raised makes uvicorn close the keep-alive connection
                        # (Starlette re-raises it); a request already on its way is lost.
                        retries[0] += 1
                        if attempt == 9:
                            raise
                        await asyncio.sleep(0.01)
                latencies.append(time.perf_counter() - began)
                statuses[response.status_code] += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - began
    return LoadResult(len(paths), statuses, latencies, seconds, retries[0])


def load(base: str, paths: Sequence[str], concurrency: int) -> LoadResult:
    """Send every path once with at most ``concurrency`` requests in flight."""
    return asyncio.run(_load(base, paths, concurrency))


async def _paced(base: str, path: str | Sequence[str], rate: float, count: int) -> LoadResult:
    paths = [path] if isinstance(path, str) else list(path)
    limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=10) as client:
        began = time.perf_counter()

        async def one(index: int) -> None:
            await asyncio.sleep(max(0.0, began + index / rate - time.perf_counter()))
            start = time.perf_counter()
            for attempt in range(10):
                try:
                    response = await client.get(paths[index % len(paths)])
                    break
                except httpx.TransportError:  # see _load: a failed task closes the connection
                    if attempt == 9:
                        raise
                    await asyncio.sleep(0.01)
            latencies.append(time.perf_counter() - start)
            statuses[response.status_code] += 1

        await asyncio.gather(*(one(index) for index in range(count)))
        seconds = time.perf_counter() - began
    return LoadResult(count, statuses, latencies, seconds)


def paced(base: str, path: str | Sequence[str], rate: float, count: int) -> LoadResult:
    """Open-loop load: ``count`` requests at ``rate`` per second, whatever the latency
    (measures the app below saturation, where a slowdown is not hidden by queueing)."""
    return asyncio.run(_paced(base, path, rate, count))


def wait_for(predicate: Any, timeout: float, interval: float = 0.05) -> Any:
    """Poll ``predicate()`` until it returns something truthy (or fail after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            msg = "condition not met in time"
            raise AssertionError(msg)
        time.sleep(interval)


def settled(server: Server, timeout: float = 30.0) -> dict[str, Any]:
    """Stats once every added task has ended in an outcome."""

    def done() -> dict[str, Any] | None:
        stats = server.stats()
        return stats if sum(stats["outcomes"].values()) >= stats["added"] else None

    result: dict[str, Any] = wait_for(done, timeout, 0.1)
    return result


def figures(stats: dict[str, Any]) -> str:
    lag = stats["lag"]
    return (
        f"outcomes={stats['outcomes']} added={stats['added']} "
        f"lag_ms p50={lag['p50'] * 1e3:.2f} p99={lag['p99'] * 1e3:.2f} max={lag['max'] * 1e3:.2f} "
        f"rss_mb={stats['rss'] / 2**20:.1f} threads={len(stats['threads'])} fds={stats['fds']}"
    )


def report(row: str, **figures: Any) -> None:
    """Print a row's figures (``pytest -s``) and append them to ``$TS_RELIABILITY_REPORT``."""
    line = json.dumps({"row": row, **figures}, default=str, sort_keys=True)
    print(f"\nRELIABILITY {line}")
    target = os.environ.get("TS_RELIABILITY_REPORT")
    if target:
        with open(target, "a") as out:
            out.write(line + "\n")


def lag_ms(stats: dict[str, Any]) -> dict[str, float]:
    lag = stats["lag"]
    return {key: round(lag[key] * 1e3, 2) for key in ("p50", "p99", "max")}


def mb(value: float) -> float:
    return round(value / 2**20, 1)
