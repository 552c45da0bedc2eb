"""The Celery app the queue tests publish to and run real ``celery worker`` processes of.

Imported by the test process (which instruments it with a test's own telemetry) and by
``celery -A tests.celeryapp worker``, which instruments it at import when
``TASKSCOPE_TEST_WORKER`` is set: spans and log events then go to JSON-lines files
(``TASKSCOPE_TEST_SPANS``, ``TASKSCOPE_TEST_LOGS``) that every pool process appends to,
and metrics are served on ``TASKSCOPE_TEST_METRICS_PORT``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

from celery import Celery
from celery.exceptions import Ignore, Reject
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from taskscope import Telemetry
from taskscope.celery import instrument_celery

app = Celery("tests.celeryapp", broker=os.environ.get("TASKSCOPE_TEST_BROKER", "memory://"))
app.conf.update(
    task_default_queue=os.environ.get("TASKSCOPE_TEST_QUEUE", "celery"),
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    task_ignore_result=True,
)


@app.task
def ok(value: int) -> int:
    return value


@app.task
def fails() -> None:
    raise ValueError("boom")


@app.task(bind=True)
def retry_once(self: Any) -> str:
    if self.request.retries == 0:
        raise self.retry(exc=KeyError("again"), countdown=0)
    return "done"


@app.task
def ignored() -> None:
    raise Ignore


@app.task
def rejected() -> None:
    raise Reject("not for us", requeue=False)


@app.task
def sleeps(seconds: float) -> None:
    time.sleep(seconds)


@app.task(time_limit=1)
def over_hard_limit() -> None:
    time.sleep(30)


@app.task
def dies() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class JsonLines:
    """Appends one JSON object per line to a file shared by the worker's processes."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def write(self, item: dict[str, Any]) -> None:
        with self._lock:
            os.write(self._fd, (json.dumps(item, default=str) + "\n").encode())


class FileSpanExporter(SpanExporter):
    def __init__(self, out: JsonLines) -> None:
        self._out = out

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            self._out.write(
                {
                    "name": span.name,
                    "kind": span.kind.name,
                    "trace_id": format(span.context.trace_id, "032x"),
                    "span_id": format(span.context.span_id, "016x"),
                    "parent_id": format(span.parent.span_id, "016x") if span.parent else None,
                    "status": span.status.status_code.name,
                    "attributes": dict(span.attributes or {}),
                    "pid": os.getpid(),
                }
            )
        return SpanExportResult.SUCCESS


class FileLogger:
    """A structlog-like logger (``info/warning/error(event, **fields)``) to JSON lines."""

    def __init__(self, out: JsonLines) -> None:
        self._out = out

    def _log(self, level: str, event: str, **fields: Any) -> None:
        self._out.write({"level": level, "event": event, "pid": os.getpid(), **fields})

    def info(self, event: str, **fields: Any) -> None:
        self._log("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log("error", event, **fields)


def _instrument_worker() -> None:
    provider = TracerProvider()
    spans = os.environ.get("TASKSCOPE_TEST_SPANS")
    if spans:
        provider.add_span_processor(SimpleSpanProcessor(FileSpanExporter(JsonLines(spans))))
    logs = os.environ.get("TASKSCOPE_TEST_LOGS")
    telemetry = Telemetry(
        tracer_provider=provider,
        otel_metrics=False,
        logger=FileLogger(JsonLines(logs)) if logs else None,
    )
    if os.environ.get("TASKSCOPE_TEST_OTEL_CELERY"):
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument(tracer_provider=provider)
    port = os.environ.get("TASKSCOPE_TEST_METRICS_PORT")
    instrument_celery(app, telemetry, metrics_port=int(port) if port else None)


if os.environ.get("TASKSCOPE_TEST_WORKER"):
    _instrument_worker()
