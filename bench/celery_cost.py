"""What taskscope.celery adds to each task a Celery worker runs, as a share of Celery's own.

    .venv/bin/python bench/celery_cost.py            # single-process metrics (solo/threads)
    .venv/bin/python bench/celery_cost.py --multiprocess   # prefork: prometheus_client files
    .venv/bin/python bench/celery_cost.py --quick

The worker's per-task path in one process, without the broker: Celery's task tracer (the
function a pool process runs per message: ``task_prerun``, the task, state handling,
``task_postrun``; ``build_tracer``) called with a message's request dict, publish stamp
and ``traceparent`` included. Variants, interleaved per round (order alternates), medians:

- ``celery``: no taskscope (Celery's own per-task cost, the denominator);
- ``ts-metrics``: ``instrument_celery`` with Prometheus metrics only (``span_mode="off"``);
- ``ts-full``: metrics and a CONSUMER span per task (SDK provider, batch processor, an
  exporter that drops).

Timed in CPU time of the benchmark thread (``time.thread_time``): the machine is shared,
and wall time would count other processes' turns. The task itself returns at once, so the
share is the worst case: any real work dilutes it.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from common import dropping_tracer_provider, median, print_environment

N_PER_ROUND = 4000


def _setup() -> tuple[Any, Any, Callable[[], dict[str, Any]]]:
    from celery import Celery
    from celery.app.trace import build_tracer

    app = Celery("bench", broker="memory://")
    app.conf.task_ignore_result = True

    @app.task(name="bench.noop")
    def noop(value: int) -> int:
        return value

    # The registered task object, as the worker passes it (``@app.task`` returns a lazy
    # proxy: every attribute access through it costs microseconds).
    task = app.tasks["bench.noop"]
    tracer = build_tracer(task.name, task, app=app, eager=False, propagate=False)

    def request() -> dict[str, Any]:
        task_id = str(uuid.uuid4())
        return {
            "id": task_id,
            "task": task.name,
            "root_id": task_id,
            "parent_id": None,
            "retries": 0,
            "eta": None,
            "delivery_info": {"exchange": "", "routing_key": "celery"},
            "taskscope_published_at": repr(time.time()),
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        }

    return app, tracer, request


def _round(tracer: Any, request: Callable[[], dict[str, Any]], n: int) -> float:
    requests = [request() for _ in range(n)]
    gc.collect()
    # CPU time of this thread: the machine is shared, wall time counts other jobs' turns.
    start = time.thread_time()
    for req in requests:
        tracer(req["id"], (1,), {}, req)
    return (time.thread_time() - start) / n * 1e6


def run(rounds: int, n: int) -> dict[str, float]:
    from prometheus_client import CollectorRegistry

    from taskscope import Telemetry
    from taskscope.celery import instrument_celery, uninstrument_celery

    app, tracer, request = _setup()
    provider = dropping_tracer_provider()
    telemetries = {
        "ts-metrics": Telemetry(
            registry=CollectorRegistry(), span_mode="off", otel_metrics=False, loop_probe=False
        ),
        "ts-full": Telemetry(
            registry=CollectorRegistry(),
            tracer_provider=provider,
            otel_metrics=False,
            loop_probe=False,
        ),
    }
    variants = ["celery", *telemetries]
    results: dict[str, list[float]] = {v: [] for v in variants}
    for index in range(rounds + 1):  # round 0 warms up
        order = variants if index % 2 == 0 else variants[::-1]
        for variant in order:
            if variant != "celery":
                instrument_celery(app, telemetries[variant])
            try:
                per_task = _round(tracer, request, n)
            finally:
                uninstrument_celery(app)
            if index:
                results[variant].append(per_task)
    provider.shutdown()
    return {v: median(values) for v, values in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--multiprocess",
        action="store_true",
        help="run with PROMETHEUS_MULTIPROC_DIR set (prefork workers' metrics mode)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.multiprocess and not args.child:
        # prometheus_client picks its value class at import: set the variable first.
        with tempfile.TemporaryDirectory() as directory:
            argv = [sys.executable, __file__, "--child", "--rounds", str(args.rounds)]
            if args.quick:
                argv.append("--quick")
            env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory}
            raise SystemExit(subprocess.call(argv, env=env))
    print_environment()
    rounds = 5 if args.quick else args.rounds
    mode = "multiprocess" if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else "single-process"
    medians = run(rounds, N_PER_ROUND)
    base = medians["celery"]
    print(f"# celery worker cost ({mode} metrics; {rounds} rounds x {N_PER_ROUND} tasks)")
    print(f"{'variant':<12} {'us/task':>9} {'added us':>9} {'share of celery':>16}")
    for variant, value in medians.items():
        added = value - base
        share = f"{added / base:+.1%}" if variant != "celery" else "-"
        print(f"{variant:<12} {value:9.2f} {added:9.2f} {share:>16}")
    metrics_share = (medians["ts-metrics"] - base) / base
    verdict = "met" if metrics_share <= 0.05 else "MISSED"
    print(
        f"celery trace path ({mode}), metrics only <= 5% of Celery's own: "
        f"{metrics_share:.1%} -> {verdict}"
    )


if __name__ == "__main__":
    main()
