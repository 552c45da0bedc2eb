"""Cost of the loop probe: the same taskscope workloads with ``loop_probe`` on and off.

Two workloads, in process, each round in a fresh asyncio loop, on/off interleaved and
shuffled per round, medians over rounds (ratios from the same run):

tasks   10,000 tiny async background tasks (5,000 responses of 2 tasks; the loop gets back
        to its timers every 64 responses, as between a server's requests)
steps   100,000 ``await asyncio.sleep(0)`` steps: 100 background tasks of 1,000 steps each
server  the same steps with a timer always pending, as in a server (uvicorn's main loop
        wakes every 0.1 s): for information, the target is checked on the first two

The probe runs no code per step. Its heartbeat does keep one timer pending, and an asyncio
loop with a pending timer reads its clock once more per iteration. A bare loop pays that
only with the probe on. A server's loop pays it with or without the probe, so the
``server`` row shows what the probe adds there.

Both variants record Prometheus metrics, no spans, and log to a logger that drops the
events. (A busy machine can still stall a round's loop, and the probe reports the stall;
printing it to a console would cost more than the probe.) Target: on/off <= 1.05.

    .venv/bin/python bench/probe_cost.py [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from common import YIELD_EVERY, median, print_environment, table, verdict

TARGET = 1.05


async def tiny() -> None:
    return None


async def stepper(steps: int) -> None:
    for _ in range(steps):
        await asyncio.sleep(0)


async def _tasks_workload(new: Callable[[], Any], count: int) -> float:
    for _ in range(50):  # warm-up: starts the probe (when on) in this loop
        batch = new()
        batch.add_task(tiny)
        await batch()
    gc.collect()
    start = time.perf_counter()
    for i in range(count // 2):
        batch = new()
        batch.add_task(tiny)
        batch.add_task(tiny)
        await batch()
        if i % YIELD_EVERY == 0:
            await asyncio.sleep(0)  # between requests: no one long stall (see common.py)
    return time.perf_counter() - start


async def _ticking() -> None:
    while True:  # uvicorn's Server.main_loop: a 0.1 s tick for the server's whole life
        await asyncio.sleep(0.1)


async def _server_steps_workload(new: Callable[[], Any], steps: int, tasks: int) -> float:
    ticker = asyncio.create_task(_ticking())
    try:
        return await _steps_workload(new, steps, tasks)
    finally:
        ticker.cancel()


async def _steps_workload(new: Callable[[], Any], steps: int, tasks: int) -> float:
    batch = new()
    batch.add_task(stepper, 10)
    await batch()  # warm-up, starts the probe
    gc.collect()
    start = time.perf_counter()
    for _ in range(tasks // 2):
        batch = new()
        batch.add_task(stepper, steps // tasks)
        batch.add_task(stepper, steps // tasks)
        await batch()
    return time.perf_counter() - start


class _DropLogger:
    def _log(self, event: str, **fields: Any) -> None:
        return None

    debug = info = warning = error = _log


def measure(rounds: int, scale: float) -> dict[str, dict[str, float]]:
    from taskscope import BackgroundTasks, Telemetry

    telemetry = {
        probe: Telemetry(
            registry=CollectorRegistry(),
            span_mode="off",
            loop_probe=probe == "on",
            logger=_DropLogger(),
        )
        for probe in ("on", "off")
    }
    n_tasks, n_steps = int(10_000 * scale), int(100_000 * scale)
    samples: dict[str, dict[str, list[float]]] = {
        w: {"on": [], "off": []} for w in ("tasks", "steps", "server")
    }
    rng = random.Random(3)
    for _ in range(rounds):
        order = ["on", "off"]
        rng.shuffle(order)
        for probe in order:
            t = telemetry[probe]

            def new(t: Any = t) -> Any:
                return BackgroundTasks(telemetry=t)

            samples["tasks"][probe].append(asyncio.run(_tasks_workload(new, n_tasks)))
            samples["steps"][probe].append(asyncio.run(_steps_workload(new, n_steps, 100)))
            samples["server"][probe].append(asyncio.run(_server_steps_workload(new, n_steps, 100)))
    return {w: {p: median(v) for p, v in by_probe.items()} for w, by_probe in samples.items()}


def report(result: dict[str, dict[str, float]]) -> tuple[str, list[tuple[str, str, bool]]]:
    rows = []
    checks = []
    for workload, label, unit, count in (
        ("tasks", "10,000 tiny tasks", "µs/task", 10_000),
        ("steps", "100,000 sleep(0) steps", "µs/step", 100_000),
        ("server", "the steps, server timer", "µs/step", 100_000),
    ):
        on, off = result[workload]["on"], result[workload]["off"]
        rows.append([label, off * 1e3, on * 1e3, on / off, unit, (on - off) / count * 1e6])
        if workload != "server":  # information (see the docstring)
            ok = on / off <= TARGET
            checks.append((f"probe: {label} on/off <= {TARGET}", f"{on / off:.2f}", ok))
    text = table(["workload", "probe off ms", "probe on ms", "on/off", "unit", "added"], rows)
    return text, checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    print_environment()
    print(f"# probe: {rounds} rounds interleaved, asyncio, taskscope metrics-only")
    text, checks = report(measure(rounds, 1.0))
    print(text)
    for label, value, ok in checks:
        print(f"{label}: {value} -> {verdict(ok)}")


if __name__ == "__main__":
    main()
