"""Async background tasks that block the loop, each at a marked line."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

import anyio
import anyio.lowlevel

BLOCK = 0.3
timestamps: dict[str, float] = {}


async def sleeps() -> None:
    await anyio.lowlevel.checkpoint()
    timestamps["sleeps"] = time.perf_counter()
    time.sleep(BLOCK)  # BLOCK: sleep
    await anyio.lowlevel.checkpoint()


def _spin(seconds: float) -> int:
    end = time.perf_counter() + seconds
    count = 0
    while time.perf_counter() < end:  # BLOCK: cpu
        count += 1  # BLOCK: cpu
    return count


async def cpu_loop() -> None:
    await anyio.lowlevel.checkpoint()
    _spin(BLOCK)
    await anyio.lowlevel.checkpoint()


async def reads_fifo(path: str) -> None:
    await anyio.lowlevel.checkpoint()
    fd = os.open(path, os.O_RDONLY)  # BLOCK: fifo
    try:
        os.read(fd, 10)
    finally:
        os.close(fd)
    await anyio.lowlevel.checkpoint()


async def receives(port: int) -> None:
    await anyio.lowlevel.checkpoint()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.recv(10)  # BLOCK: recv
    await anyio.lowlevel.checkpoint()


async def takes_lock(lock: threading.Lock) -> None:
    await anyio.lowlevel.checkpoint()
    with lock:  # BLOCK: lock
        pass
    await anyio.lowlevel.checkpoint()


async def dumps(payload: Any) -> None:
    await anyio.lowlevel.checkpoint()
    json.dumps(payload)  # BLOCK: dumps
    await anyio.lowlevel.checkpoint()  # BLOCK: after-dumps


async def _helper() -> None:
    await anyio.lowlevel.checkpoint()
    time.sleep(BLOCK)  # BLOCK: nested
    await anyio.lowlevel.checkpoint()


async def nested() -> None:
    await anyio.lowlevel.checkpoint()
    await _helper()


async def _child(blocks: bool) -> None:
    await anyio.sleep(0.01)
    if blocks:
        time.sleep(BLOCK)  # BLOCK: child
    await anyio.lowlevel.checkpoint()


async def gathers() -> None:
    import asyncio

    await asyncio.gather(_child(False), _child(True))


async def task_group() -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(_child, False)
        tg.start_soon(_child, True)


async def blocks_last() -> None:
    await anyio.lowlevel.checkpoint()
    time.sleep(BLOCK)  # BLOCK: last


async def innocent() -> None:
    for _ in range(3):
        await anyio.sleep(0.01)


async def short_blocks(count: int = 20, each: float = 0.03) -> None:
    for _ in range(count):
        time.sleep(each)
        await anyio.lowlevel.checkpoint()


async def one_long_step(count: int = 20, each: float = 0.03) -> None:
    await anyio.lowlevel.checkpoint()
    for _ in range(count):
        time.sleep(each)  # BLOCK: long-step
    await anyio.lowlevel.checkpoint()


async def short_step(each: float = 0.01) -> None:
    """One short step after a yield: many of these resumed together stall one iteration."""
    await anyio.lowlevel.checkpoint()
    time.sleep(each)  # BLOCK: short-step
    await anyio.lowlevel.checkpoint()


def outside(seconds: float = BLOCK) -> None:
    """Blocking code that is no background task's (an endpoint's, a loop callback's)."""
    time.sleep(seconds)  # BLOCK: outside


async def trio_nursery() -> None:
    import trio

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_child, False)
        nursery.start_soon(_child, True)
