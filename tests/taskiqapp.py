"""The taskiq broker the queue tests send to and run a real ``taskiq worker`` of.

Like ``tests.celeryapp``: with ``TASKSCOPE_TEST_WORKER`` set (the worker process), the
middleware gets a telemetry whose spans and log events go to JSON-lines files and serves
metrics on ``TASKSCOPE_TEST_METRICS_PORT``. The test process builds its own broker with
:func:`make_broker` and its own telemetry.
"""

from __future__ import annotations

import os
import time

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from taskiq import AsyncBroker, InMemoryBroker, SimpleRetryMiddleware
from taskiq_redis import ListQueueBroker

from taskscope import Telemetry
from taskscope.taskiq import TaskscopeMiddleware
from tests.celeryapp import FileLogger, FileSpanExporter, JsonLines


def make_broker(url: str, queue: str, middleware: TaskscopeMiddleware) -> AsyncBroker:
    return ListQueueBroker(url, queue_name=queue).with_middlewares(
        middleware, SimpleRetryMiddleware(default_retry_count=2)
    )


def _worker_middleware() -> TaskscopeMiddleware:
    provider = TracerProvider()
    provider.add_span_processor(
        SimpleSpanProcessor(FileSpanExporter(JsonLines(os.environ["TASKSCOPE_TEST_SPANS"])))
    )
    telemetry = Telemetry(
        tracer_provider=provider,
        otel_metrics=False,
        logger=FileLogger(JsonLines(os.environ["TASKSCOPE_TEST_LOGS"])),
        lag_interval=0.02,
    )
    return TaskscopeMiddleware(
        telemetry, metrics_port=int(os.environ["TASKSCOPE_TEST_METRICS_PORT"])
    )


if os.environ.get("TASKSCOPE_TEST_WORKER"):
    broker = make_broker(
        os.environ["TASKSCOPE_TEST_BROKER"],
        os.environ["TASKSCOPE_TEST_QUEUE"],
        _worker_middleware(),
    )
else:  # the test process sends through its own make_broker(); this one never connects
    broker = InMemoryBroker()


@broker.task
async def ok(value: int) -> int:
    return value


@broker.task
async def fails() -> None:
    raise ValueError("boom")


@broker.task(retry_on_error=True, max_retries=2)
async def fails_then_retried() -> None:
    raise KeyError("again")


@broker.task
async def blocks_the_loop() -> None:
    time.sleep(0.3)  # on the event loop: the loop probe sees the lag


@broker.task
def sync_ok() -> str:
    return "ran in the worker's threadpool"
