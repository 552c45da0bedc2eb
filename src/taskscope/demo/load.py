"""A small, bounded load generator (raw HTTP/1.1 on asyncio; no extra dependency).

Traffic: ``rate`` notification requests per second, a burst of report exports every two
seconds (more at once than the demo has worker threads), about one thumbnail per
second, and one order at the start (its task hangs on a dead upstream). Concurrency is
capped; requests go only to the demo's own address.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field

REPORT_BURST = 6
REPORT_EVERY = 2.0
THUMBNAIL_EVERY = 1.0
MAX_CONCURRENCY = 64
TIMEOUT = 5.0


@dataclass
class LoadStats:
    """What the client saw (read by the view from another thread)."""

    sent: int = 0
    ok: int = 0
    errors: int = 0
    dropped: int = 0
    """Not sent: the concurrency cap was reached (the server is saturated)."""
    last_error: str = ""
    latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, seconds: float | None, error: str = "") -> None:
        with self.lock:
            if seconds is None:
                self.errors += 1
                self.last_error = error
            else:
                self.ok += 1
                self.latencies.append(seconds)
                if len(self.latencies) > 20_000:
                    del self.latencies[:10_000]

    def latency(self, q: float) -> float | None:
        with self.lock:
            values = sorted(self.latencies[-2_000:])
        if not values:
            return None
        return values[min(len(values) - 1, int(q * len(values)))]


async def request(host: str, port: int, path: str) -> float:
    """POST ``path``; the seconds until the whole response arrived (raises on errors)."""
    start = time.perf_counter()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT)
    try:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode("ascii"))
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), TIMEOUT)
        length = 0
        while True:
            line = await asyncio.wait_for(reader.readline(), TIMEOUT)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
        parts = status.split()
        if len(parts) < 2 or not parts[1].startswith(b"2"):
            msg = f"HTTP {status!r}"
            raise ConnectionError(msg)
        return time.perf_counter() - start
    finally:
        writer.close()


def plan(rate: float) -> list[tuple[float, str]]:
    """Two seconds of traffic: ``(offset seconds, path)`` pairs, sorted by offset."""
    items: list[tuple[float, str]] = []
    n = round(rate * REPORT_EVERY)
    users = itertools.cycle(["ada", "grace", "linus", "barbara", "guido", "margaret"])
    for i in range(n):
        query = "?q=demo" if i % 3 == 0 else ""
        items.append((i / rate, f"/send-notification/{next(users)}@example.com{query}"))
    items.extend((0.5, f"/reports/{i}") for i in range(REPORT_BURST))
    t = 0.25
    while t < REPORT_EVERY:
        items.append((t, f"/thumbnails/{int(t * 100)}"))
        t += THUMBNAIL_EVERY
    return sorted(items, key=lambda item: item[0])


async def run_load(
    host: str, port: int, rate: float, stop: threading.Event, stats: LoadStats
) -> None:
    """Send the planned traffic again and again until ``stop`` is set."""
    limit = asyncio.Semaphore(MAX_CONCURRENCY)
    pending: set[asyncio.Task[None]] = set()

    async def one(path: str) -> None:
        try:
            seconds = await request(host, port, path)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            seconds = None
        finally:
            limit.release()
        stats.add(seconds)

    cycle = plan(rate)
    begin = time.perf_counter()
    await limit.acquire()
    stats.sent += 1
    first_order = asyncio.create_task(one("/orders/1"))
    pending.add(first_order)
    first_order.add_done_callback(pending.discard)
    for round_number in itertools.count():
        base = begin + round_number * REPORT_EVERY
        for offset, path in cycle:
            # stop is a threading.Event (set by the main thread): poll it
            while not stop.is_set() and (delay := base + offset - time.perf_counter()) > 0:  # noqa: ASYNC110
                await asyncio.sleep(min(delay, 0.2))
            if stop.is_set():
                break
            if limit.locked():  # server saturated: drop the request rather than pile up
                stats.dropped += 1
                continue
            await limit.acquire()
            stats.sent += 1
            task = asyncio.create_task(one(path))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if stop.is_set():
            break
    if pending:
        await asyncio.wait(pending, timeout=TIMEOUT)
