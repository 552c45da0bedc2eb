"""Per-task cost, in process (no HTTP): add 2 tiny tasks to a tasks object, await it, repeat.

Every repetition of every variant runs in its own fresh asyncio loop (so one variant's loop
probe cannot tax another's), after a warm-up in that loop; variants are interleaved and
shuffled per round; figures are medians over rounds. Prints microseconds per task, the cost
added over plain Starlette, and the ratios the targets are stated in.

    .venv/bin/python bench/per_task.py [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import time
from typing import Any

from common import YIELD_EVERY, median, print_environment, table, verdict
from variants import VARIANTS, Variant


async def tiny_async(n: int) -> None:
    return None


def tiny_sync(n: int) -> None:
    return None


async def _drive(variant: Variant, func: Any, tasks: int, warmup: int) -> float:
    token = variant.enter()
    func = variant.task(func)
    try:
        new = variant.new
        for _ in range(warmup // 2):
            batch = new()
            batch.add_task(func, 1)
            batch.add_task(func, 2)
            await batch()
        gc.collect()
        start = time.perf_counter()
        for i in range(tasks // 2):
            batch = new()
            batch.add_task(func, 1)
            batch.add_task(func, 2)
            await batch()
            if i % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # as a server does between requests (see README)
        return time.perf_counter() - start
    finally:
        variant.exit(token)


def measure(
    names: tuple[str, ...], rounds: int, n_async: int, n_sync: int
) -> dict[str, dict[str, float]]:
    """Median microseconds per task, by kind ("async"/"sync") and variant."""
    variants = {name: Variant(name) for name in names}
    samples: dict[str, dict[str, list[float]]] = {
        kind: {name: [] for name in names} for kind in ("async", "sync")
    }
    rng = random.Random(1)
    try:
        for _ in range(rounds):
            order = list(names)
            rng.shuffle(order)
            for name in order:
                v = variants[name]
                elapsed = asyncio.run(_drive(v, tiny_async, n_async, n_async // 5))
                samples["async"][name].append(elapsed / n_async * 1e6)
                elapsed = asyncio.run(_drive(v, tiny_sync, n_sync, n_sync // 5))
                samples["sync"][name].append(elapsed / n_sync * 1e6)
    finally:
        for v in variants.values():
            v.close()
    return {
        kind: {name: median(values) for name, values in by_name.items()}
        for kind, by_name in samples.items()
    }


def report(result: dict[str, dict[str, float]]) -> tuple[str, list[tuple[str, str, bool]]]:
    rows = []
    for name in result["async"]:
        row: list[object] = [name]
        for kind in ("async", "sync"):
            us = result[kind][name]
            plain = result[kind]["plain"]
            row += [us, us - plain, us / plain]
        rows.append(row)
    text = table(
        [
            "variant",
            "async µs/task",
            "async added µs",
            "async x plain",
            "sync µs/task",
            "sync added µs",
            "sync x plain",
        ],
        rows,
    )
    checks: list[tuple[str, str, bool]] = []
    a = result["async"]
    if "hand" in a and "ts-full" in a:
        hand_added = a["hand"] - a["plain"]
        full_added = a["ts-full"] - a["plain"]
        r = full_added / hand_added if hand_added > 0 else float("inf")
        checks.append(
            (
                "per-task: ts-full added cost / hand-wrapper added cost (async) <= 0.8",
                f"{r:.2f}",
                r <= 0.8,
            )
        )
    return text, checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tasks and rounds (~15 s)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    n_async, n_sync = (2000, 400) if args.quick else (6000, 1200)
    names = tuple(args.variants.split(","))
    if "plain" not in names:
        names = ("plain", *names)
    print_environment()
    print(f"# per-task: {rounds} rounds, {n_async} async + {n_sync} sync tasks per round, asyncio")
    text, checks = report(measure(names, rounds, n_async, n_sync))
    print(text)
    for label, value, ok in checks:
        print(f"{label}: {value} -> {verdict(ok)}")


if __name__ == "__main__":
    main()
