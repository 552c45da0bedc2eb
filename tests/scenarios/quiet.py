"""Background tasks that wait without blocking the loop (negative controls)."""

from __future__ import annotations

import time

import anyio
import anyio.to_thread

WAIT = 0.3


async def awaits_socket(port: int) -> None:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    async with stream:
        await stream.receive(10)


async def sleeps_async() -> None:
    await anyio.sleep(WAIT)


async def sleeps_in_thread() -> None:
    await anyio.to_thread.run_sync(time.sleep, WAIT)


def sync_sleeps() -> None:
    time.sleep(WAIT)
