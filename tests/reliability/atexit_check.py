"""Run as a script: tasks still running (async on the loop, sync in a worker thread) and
queued when the interpreter exits are recorded as ``abandoned`` by taskscope's atexit hook.

The loop runs in a daemon thread that the main thread simply leaves behind, so neither the
loop nor the tasks get a chance to end. Prints one JSON line with the final counts. With
``late``, the tasks end 0.3 s into the exit, after being recorded: still one outcome each.
"""

from __future__ import annotations

import atexit
import json
import sys
import threading
import time

from prometheus_client import CollectorRegistry

registry = CollectorRegistry()
LATE = "late" in sys.argv  # the running tasks end 0.3 s into interpreter exit


def _final() -> None:  # registered before taskscope's hook: runs after it (LIFO)
    if LATE:
        time.sleep(0.6)  # the tasks finish now, after taskscope recorded them abandoned
    counts: dict[str, float] = {}
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == "taskscope_tasks_total" and sample.value:  # not the zeros
                key = sample.labels["outcome"]
                counts[key] = counts.get(key, 0) + sample.value
    print("FINAL " + json.dumps(counts), flush=True)


atexit.register(_final)

import anyio  # noqa: E402

from taskscope import BackgroundTasks, Telemetry  # noqa: E402

telemetry = Telemetry(registry=registry, otel_metrics=False, span_mode="off")
loop_started = threading.Event()
thread_started = threading.Event()
forever = threading.Event()


async def on_loop() -> None:
    loop_started.set()
    if LATE:
        await anyio.sleep(0.3)
    else:
        await anyio.sleep_forever()


def in_thread() -> None:
    thread_started.set()
    forever.wait(0.3 if LATE else None)


async def queued() -> None:
    pass


async def main() -> None:
    first = BackgroundTasks(telemetry=telemetry)
    first.add_task(on_loop)
    first.add_task(queued)
    second = BackgroundTasks(telemetry=telemetry)
    second.add_task(in_thread)
    second.add_task(queued)
    async with anyio.create_task_group() as group:
        group.start_soon(first)
        group.start_soon(second)


threading.Thread(target=anyio.run, args=(main,), daemon=True).start()
if not (loop_started.wait(10) and thread_started.wait(10)):
    raise SystemExit("tasks did not start")
# the main thread returns: atexit hooks run while both tasks are still running
