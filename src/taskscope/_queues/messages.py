"""What both queue integrations share: the publish stamp, the wait, the two span kinds.

A published message carries two things taskscope needs on the worker: the wall-clock time
of its publication (``taskscope_published_at``) and the W3C trace context (``traceparent``,
``tracestate``). Wall-clock time, not a monotonic clock: the two ends are different
processes, often different machines (clock skew between them shows up in the wait; the wait
is clamped at zero).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, MutableMapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import SpanKind

from taskscope._run import finish_span, start_task_span

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span

    from taskscope._record import Outcome
    from taskscope._runtime import Runtime

PUBLISHED_AT = "taskscope_published_at"
"""Message header: seconds since the epoch when the message was published."""


def wall_clock() -> float:
    return time.time()  # across processes only the wall clock is shared


def stamp(headers: MutableMapping[str, Any], span: Span | None) -> None:
    """Stamp the publish time and the trace context (of ``span``, or the current one)."""
    headers[PUBLISHED_AT] = repr(wall_clock())
    context = trace.set_span_in_context(span) if span is not None else None
    inject(headers, context=context)


def queue_wait(published_at: object, eta: object, now: float) -> float | None:
    """Seconds from publication (or the ETA, if later) to ``now``; None without a stamp."""
    try:
        start = float(published_at)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    due = _timestamp(eta)
    if due is not None and due > start:
        start = due
    return max(0.0, now - start)


def _timestamp(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    if isinstance(value, int | float):
        return float(value)
    return None


def extract_context(getter: Callable[[str], object]) -> Context:
    """The trace context a message carries (``getter`` reads one header)."""
    carrier: dict[str, str] = {}
    for key in ("traceparent", "tracestate"):
        value = getter(key)
        if isinstance(value, str):
            carrier[key] = value
    return extract(carrier) if carrier else otel_context.Context()


def trace_id_of_header(traceparent: object) -> str | None:
    """The trace id of a W3C ``traceparent`` value, without a propagator (no spans made)."""
    if (
        isinstance(traceparent, str)
        and len(traceparent) >= 55
        and traceparent[2] == "-"
        and traceparent[35] == "-"
    ):
        trace_id = traceparent[3:35]
        try:
            valid = int(trace_id, 16) != 0 and "_" not in trace_id and " " not in trace_id
        except ValueError:
            return None
        return trace_id.lower() if valid else None
    return None


def span_ids(span: Span | None) -> tuple[str | None, str | None]:
    if span is None:
        return None, None
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None, None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def trace_id_of(context: Context) -> str | None:
    ctx = trace.get_current_span(context).get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def start_producer_span(
    runtime: Runtime, name: str, system: str, attributes: Mapping[str, Any]
) -> Span | None:
    """``publish {task}``, kind PRODUCER, child of the current span. Never attached."""
    try:
        tracer = runtime.tracer
        if tracer is None:
            return None
        return tracer.start_span(
            f"publish {name}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": system,
                "messaging.operation.type": "send",
                "messaging.operation.name": "publish",
                "code.function.name": name,
                **attributes,
            },
        )
    except Exception:
        runtime.absorb("tracing")
        return None


def start_consumer_span(
    runtime: Runtime,
    name: str,
    parent: Context,
    *,
    wait: float | None,
    system: str,
    attributes: Mapping[str, Any],
    sync: bool = True,
) -> tuple[Span | None, object]:
    """``background_task {task}``, kind CONSUMER, made current; parent from the message."""
    return start_task_span(
        runtime,
        name,
        parent,
        kind=SpanKind.CONSUMER,
        sync=sync,
        wait=wait if wait is not None else 0.0,
        attributes={
            "messaging.system": system,
            "messaging.operation.type": "process",
            **attributes,
        },
    )


def end_span(
    runtime: Runtime,
    span: Span,
    outcome: Outcome,
    *,
    error: BaseException | None = None,
    message: str | None = None,
    token: object = None,
) -> None:
    """End a producer or consumer span the way the in-process task span ends."""
    finish_span(runtime, span, token, outcome, error, message=message)
