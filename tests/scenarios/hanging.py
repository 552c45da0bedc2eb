"""Background tasks that hang (wait on something that does not come), each at a marked line.

They wait until the test lets them go (``release``), so a test ends; ``entered`` is set
right before the marked wait, so the test knows when the task is there.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread


async def awaits_future(future: asyncio.Future[None], entered: threading.Event) -> None:
    entered.set()
    await future  # BLOCK: hung-future


async def awaits_event(release: anyio.Event, entered: threading.Event) -> None:
    entered.set()
    await release.wait()  # BLOCK: hung-event


async def reads_slow_server(port: int, entered: threading.Event) -> bytes:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        entered.set()
        return await stream.receive()  # BLOCK: hung-server


async def _quick() -> None:
    await anyio.lowlevel.checkpoint()


async def _child_waits(release: anyio.Event, entered: threading.Event) -> None:
    entered.set()
    await release.wait()  # BLOCK: hung-child


async def gathers(release: anyio.Event, entered: threading.Event) -> None:
    await asyncio.gather(_quick(), _child_waits(release, entered))  # BLOCK: hung-gather


async def task_group(release: anyio.Event, entered: threading.Event) -> None:
    async with anyio.create_task_group() as group:
        group.start_soon(_quick)
        group.start_soon(_child_waits, release, entered)


def sleeps(release: threading.Event, entered: threading.Event) -> None:
    entered.set()
    while not release.is_set():  # BLOCK: hung-sleep
        time.sleep(0.01)  # BLOCK: hung-sleep


def takes_lock(lock: Any, entered: threading.Event) -> None:
    entered.set()
    with lock:  # BLOCK: hung-lock
        pass


async def asyncio_task_group(release: anyio.Event, entered: threading.Event) -> None:
    async with asyncio.TaskGroup() as group:
        group.create_task(_quick())
        group.create_task(_child_waits(release, entered))


async def trio_nursery(release: anyio.Event, entered: threading.Event) -> None:
    import trio

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_quick)
        nursery.start_soon(_child_waits, release, entered)


async def fails_after(release: anyio.Event, entered: threading.Event) -> None:
    entered.set()
    await release.wait()  # BLOCK: hung-then-fails
    msg = "upstream gave up"
    raise ConnectionError(msg)


async def awaits_a_task(release: anyio.Event, entered: threading.Event, factory: Any) -> None:
    child = factory(_child_waits(release, entered))
    await child  # BLOCK: hung-awaits-task


async def waits_for_a_flag(flag: threading.Event, entered: threading.Event) -> None:
    entered.set()
    await anyio.to_thread.run_sync(flag.wait)  # BLOCK: hung-flag


queue_waits_on: dict[str, Any] = {}  # a queued task's arguments are serialised: events here


async def queued_waits() -> None:
    queue_waits_on["entered"].set()
    await queue_waits_on["release"].wait()  # BLOCK: hung-queued
