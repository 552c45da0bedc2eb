"""The demo's Celery worker app module, instrumented by taskscope::

    celery -A taskscope.demo.worker worker --pool=solo --without-gossip --without-mingle

``TASKSCOPE_DEMO_WORKER_METRICS_PORT`` (default 9464) and ``TASKSCOPE_DEMO_WORKER_METRICS_ADDR``
(default 127.0.0.1; 0.0.0.0 in a container) place the worker's ``/metrics``. With
``OTEL_EXPORTER_OTLP_ENDPOINT`` set, its spans and OTel metrics are exported over OTLP.
Prefork pools: set ``PROMETHEUS_MULTIPROC_DIR`` (an empty directory) before starting it.
"""

from __future__ import annotations

import os
from typing import Any

from celery import signals

from taskscope import Telemetry
from taskscope.celery import instrument_celery
from taskscope.demo.queue import celery_app

app = celery_app
_otlp: list[Any] = []


def _telemetry() -> Telemetry | None:
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return None
    from taskscope.otlp import setup_otlp_from_env

    handle = setup_otlp_from_env()
    _otlp.append(handle)
    return handle.telemetry()


def _flush(**_: Any) -> None:
    for handle in _otlp:
        handle.shutdown()


signals.worker_shutdown.connect(_flush, weak=False)
instrument_celery(
    celery_app,
    _telemetry(),
    metrics_port=int(os.environ.get("TASKSCOPE_DEMO_WORKER_METRICS_PORT", "9464")),
    metrics_addr=os.environ.get("TASKSCOPE_DEMO_WORKER_METRICS_ADDR", "127.0.0.1"),
)
