"""The Celery app of bench/celery_worker_cost.py (``celery -A celery_bench_app worker``).

``TASKSCOPE_BENCH_BROKER``: the broker; ``TASKSCOPE_BENCH_VARIANT``: ``celery`` (plain),
``ts-metrics`` (instrument_celery, Prometheus metrics only) or ``ts-full`` (metrics and a
span per task; SDK provider, batch processor, an exporter that drops).
"""

from __future__ import annotations

import os

from celery import Celery
from prometheus_client import CollectorRegistry

from taskscope import Telemetry
from taskscope.celery import instrument_celery

app = Celery("celery_bench_app", broker=os.environ.get("TASKSCOPE_BENCH_BROKER", "memory://"))
app.conf.update(task_ignore_result=True, worker_hijack_root_logger=False)


@app.task(name="bench.noop")
def noop(value: int) -> int:
    return value


_variant = os.environ.get("TASKSCOPE_BENCH_VARIANT", "celery")
if _variant == "ts-metrics":
    instrument_celery(
        app, Telemetry(registry=CollectorRegistry(), span_mode="off", otel_metrics=False)
    )
elif _variant == "ts-full":
    from common import dropping_tracer_provider

    instrument_celery(
        app,
        Telemetry(
            registry=CollectorRegistry(),
            tracer_provider=dropping_tracer_provider(),
            otel_metrics=False,
        ),
    )
