"""Event-loop lag while /metrics is scraped under load (issue 11, item 7).

A uvicorn process (uvloop + httptools when installed) serves a Starlette app with
taskscope's ``MetricsApp`` on ``/metrics`` over ~10k series (task names made with
``task_name``), a cheap ``/work`` endpoint, and a 1 ms heartbeat on its loop that records
how late each wake-up was. The client paces ``/work`` at ``--rate`` req/s and, in the
scrape phase, fires a burst of ``--burst`` concurrent scrapes every second. Phases
alternate (quiet, scrapes) ``--rounds`` times; the figures are the heartbeat's worst and
p99 lateness per phase (medians over rounds), and the scrape latency.

    .venv/bin/python bench/scrape_lag.py [--rate 500] [--burst 20] [--gzip] [--rounds 4]
        [--variant SRC[:CHUNK_SIZE] ...]   # e.g. an exported older src/ against this one
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


# -- the server ----------------------------------------------------------------------------
def build_app(names: int, chunk_size: int | None = None) -> Any:
    from prometheus_client import CollectorRegistry
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    from taskscope import BackgroundTasks, Telemetry, task_name
    from taskscope.exposition import MetricsApp

    registry = CollectorRegistry()
    telemetry = Telemetry(registry=registry, span_mode="off", otel_metrics=False, loop_probe=False)
    lateness: list[float] = []

    async def heartbeat() -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            lateness.append(time.perf_counter() - start - 0.001)

    async def populate() -> None:
        for i in range(names):
            tasks = BackgroundTasks(telemetry=telemetry)
            tasks.add_task(task_name(f"bench.jobs.task_{i:04d}")(_noop))
            tasks.add_task(task_name(f"bench.jobs.task_{i:04d}")(_sync_noop))
            await tasks()

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await populate()
        beat = asyncio.ensure_future(heartbeat())
        yield
        beat.cancel()

    async def work(request: Request) -> Response:
        tasks = BackgroundTasks(telemetry=telemetry)  # a task per request: records contend
        tasks.add_task(_noop)
        return PlainTextResponse("ok", background=tasks)

    async def lag(request: Request) -> Response:
        values = sorted(lateness)
        lateness.clear()
        if not values:
            return JSONResponse({"max": 0, "p99": 0, "n": 0, "over20": 0})
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
        over = sum(1 for v in values if v > 0.020)
        return JSONResponse({"max": values[-1], "p99": p99, "n": len(values), "over20": over})

    async def series(request: Request) -> Response:
        count = sum(len(m.samples) for m in registry.collect())
        return JSONResponse({"series": count})

    metrics = (
        MetricsApp(registry) if chunk_size is None else MetricsApp(registry, chunk_size=chunk_size)
    )
    return Starlette(
        routes=[
            Route("/work", work),
            Route("/lag", lag),
            Route("/series", series),
            Route("/metrics", metrics),
        ],
        lifespan=lifespan,
    )


async def _noop() -> None:
    pass


def _sync_noop() -> None:
    pass


# -- the client ----------------------------------------------------------------------------
# A minimal keep-alive HTTP/1.1 client on asyncio streams: an httpx client pacing 500 req/s
# needs most of a CPU on its own, which this 2-CPU machine shares with the server.
async def _get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, gzip: bool
) -> int:
    encoding = "gzip" if gzip else "identity"
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: bench\r\nAccept-Encoding: {encoding}\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status


async def load(
    port: int, rate: float, seconds: float, burst: int, use_gzip: bool, workers: int = 10
) -> list[float]:
    """Pace /work at ``rate`` over ``workers`` connections; with ``burst``, fire that
    many concurrent scrapes (each on its own connection) every second."""
    scrape_times: list[float] = []
    start = time.perf_counter()

    async def worker(offset: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        interval = workers / rate
        next_at = start + offset * interval / workers
        while next_at - start < seconds:
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            assert await _get(reader, writer, "/work", False) == 200
            next_at += interval
        writer.close()

    async def scrape() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        began = time.perf_counter()
        assert await _get(reader, writer, "/metrics", use_gzip) == 200
        scrape_times.append(time.perf_counter() - began)
        writer.close()

    async def scrapes() -> None:
        next_burst = start + 0.5
        while next_burst - start < seconds - 0.5:
            await asyncio.sleep(max(0.0, next_burst - time.perf_counter()))
            await asyncio.gather(*(scrape() for _ in range(burst)))
            next_burst += 1.0

    jobs = [worker(i) for i in range(workers)]
    if burst:
        jobs.append(scrapes())
    await asyncio.gather(*jobs)
    return scrape_times


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def start_server(
    src: str, names: int, chunk_size: int | None
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [sys.executable, __file__, "--serve", str(port), "--names", str(names)]
    if chunk_size is not None:
        command += ["--chunk-size", str(chunk_size)]
    server = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": src})
    deadline = time.monotonic() + 60
    while True:
        try:
            get_json(f"http://127.0.0.1:{port}/series")
            return server, port
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def summary(label: str, runs: list[dict[str, float]]) -> str:
    worst = [r["max"] * 1000 for r in runs]
    p99 = [r["p99"] * 1000 for r in runs]
    over = sum(r["over20"] for r in runs)
    total = sum(r["n"] for r in runs)
    return (
        f"  {label:8} lag max per round {', '.join(f'{w:.1f}' for w in worst)} ms "
        f"(median {statistics.median(worst):.1f}); p99 median {statistics.median(p99):.2f} ms; "
        f"beats late > 20 ms: {over} of {total}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--names", type=int, default=165)
    parser.add_argument("--gzip", action="store_true")
    parser.add_argument(
        "--variant",
        action="append",
        help="SRC[:CHUNK_SIZE] - a taskscope source tree to serve (repeat to compare; the "
        "variants take turns, round by round, so they share the machine's noise)",
    )
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        import uvicorn

        uvicorn.run(
            build_app(args.names, args.chunk_size),
            host="127.0.0.1",
            port=args.serve,
            log_level="warning",
            access_log=False,
        )
        return
    variants = args.variant or [str(ROOT / "src")]
    servers = []
    try:
        for variant in variants:
            src, _, chunk = variant.partition(":")
            servers.append((variant, *start_server(src, args.names, int(chunk) if chunk else None)))
        series = get_json(f"http://127.0.0.1:{servers[0][2]}/series")["series"]
        print(f"series {series}; rate {args.rate}/s; burst {args.burst}; gzip {args.gzip}")
        results: dict[str, dict[str, list[Any]]] = {
            v: {"quiet": [], "scrapes": [], "times": []} for v in variants
        }
        for _ in range(args.rounds):
            for variant, _server, port in servers:
                base = f"http://127.0.0.1:{port}"
                get_json(f"{base}/lag")
                asyncio.run(load(port, args.rate, args.seconds, 0, args.gzip))
                results[variant]["quiet"].append(get_json(f"{base}/lag"))
                times = asyncio.run(load(port, args.rate, args.seconds, args.burst, args.gzip))
                results[variant]["times"] += times
                results[variant]["scrapes"].append(get_json(f"{base}/lag"))
        for variant in variants:
            print(variant)
            print(summary("quiet", results[variant]["quiet"]))
            print(summary("scrapes", results[variant]["scrapes"]))
            times = sorted(results[variant]["times"])
            print(
                f"  scrape latency p50 {statistics.median(times) * 1000:.0f} ms, "
                f"max {times[-1] * 1000:.0f} ms ({len(times)} scrapes)"
            )
    finally:
        for _, server, _ in servers:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
