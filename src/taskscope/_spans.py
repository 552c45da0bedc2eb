"""A task's span: started and made current at the task's start, ended with its outcome.

With the OpenTelemetry SDK's tracer the span is *deferred*: the ids and the sampler's
decision are made when the task starts, exactly as ``Tracer.start_span`` makes them; a
lightweight :class:`DeferredSpan` carrying that span context is made current for the task
(so the task's own spans parent to it, and ``trace.get_current_span()`` returns it); it
buffers attributes, events, links and status (thread-safely: the watchdog thread adds
``task.hung``); at its end one SDK ``ReadableSpan`` is built, bounded by the provider's
span limits as the SDK bounds them, and handed to the provider's span processor's
``on_end``. What the exporters see is what an SDK span would give.

``on_start`` and the SDK's ``_on_ending`` are never called with a deferred span: the
deferred span is used only while every registered span processor's ``on_start`` and
``_on_ending`` are the SDK's no-ops (``SpanProcessor``, ``SimpleSpanProcessor``,
``BatchSpanProcessor`` and subclasses that do not override them). A processor with its own
``on_start`` (or ``_on_ending``) gets a real SDK span, started and ended through
``Tracer.start_span``, for every task, so it sees exactly what it expects.

Any other tracer (a non-SDK provider, the no-op provider, an SDK without the attributes
read here, a tracer disabled by the SDK's tracer configurator) takes the public API path:
``tracer.start_span``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from itertools import chain
from time import time_ns
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode

from taskscope._safe import qualified_type_name, safe_stacktrace

if TYPE_CHECKING:
    from types import TracebackType

    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer
    from opentelemetry.util import types

    from taskscope._record import Outcome
    from taskscope._run import Capture, TaskRun
    from taskscope._runtime import Runtime

try:  # the SDK is an extra: without it, every span goes through the public API
    from opentelemetry.attributes import BoundedAttributes
    from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
    from opentelemetry.sdk.trace import Span as _SdkSpan
    from opentelemetry.sdk.trace import Tracer as _SdkTracer
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.util import BoundedList
except ImportError:  # pragma: no cover
    _SdkTracer = None  # type: ignore[assignment,misc]

_UNSET = Status(StatusCode.UNSET)
_PLAIN = frozenset((bool, int, float))  # values the SDK's attribute cleaning keeps as they are
_SAMPLED = trace.TraceFlags(trace.TraceFlags.SAMPLED)
_NOT_SAMPLED = trace.TraceFlags(trace.TraceFlags.DEFAULT)
# Newer SDKs (W3C trace context level 2) flag random trace ids; older ones have no such flag.
_RANDOM_TRACE_ID: int | None = getattr(trace.TraceFlags, "RANDOM_TRACE_ID", None)
_RANDOM_SAMPLED = trace.TraceFlags(_SAMPLED | (_RANDOM_TRACE_ID or 0))
_RANDOM_NOT_SAMPLED = trace.TraceFlags(_NOT_SAMPLED | (_RANDOM_TRACE_ID or 0))


def _quiet_hooks() -> tuple[frozenset[Any], frozenset[Any]]:
    """The SDK's own no-op ``on_start`` and ``_on_ending`` implementations."""
    if _SdkTracer is None:  # pragma: no cover
        return frozenset(), frozenset()
    classes = (SpanProcessor, SimpleSpanProcessor, BatchSpanProcessor)
    on_start = frozenset(c.__dict__["on_start"] for c in classes if "on_start" in c.__dict__)
    on_ending = frozenset(c.__dict__["_on_ending"] for c in classes if "_on_ending" in c.__dict__)
    return on_start, on_ending


_QUIET_ON_START, _QUIET_ON_ENDING = _quiet_hooks()
# The last span processor list checked, and whether all of them ignore on_start/_on_ending.
_checked: tuple[object, bool] = ((), False)


def _only_on_end(active: object) -> bool:
    """Whether every processor behind the provider's active processor ignores ``on_start``
    and ``_on_ending`` (so a span handed to ``on_end`` only is all they would see).
    Checked again whenever the provider's processor list changes (a processor added)."""
    global _checked  # noqa: PLW0603 - a one-entry cache, process-wide
    processors = getattr(active, "_span_processors", None)
    if processors is None:
        return False
    checked, quiet = _checked
    if processors is checked:
        return quiet
    quiet = isinstance(processors, tuple) and all(_quiet(p) for p in processors)
    _checked = (processors, quiet)
    return quiet


def _quiet(processor: object) -> bool:
    own = getattr(processor, "__dict__", None)
    if own and ("on_start" in own or "_on_ending" in own):  # set on the instance
        return False
    cls = type(processor)
    if getattr(cls, "on_start", None) not in _QUIET_ON_START:
        return False
    on_ending = getattr(cls, "_on_ending", None)
    return on_ending is None or on_ending in _QUIET_ON_ENDING


def _sdk_tracer(tracer: Tracer) -> Any:
    """The SDK tracer behind ``tracer`` if the deferred span can serve it, else None."""
    if _SdkTracer is None:  # pragma: no cover
        return None
    found: Any = tracer
    if not isinstance(found, _SdkTracer):
        found = getattr(found, "_real_tracer", None)  # a ProxyTracer, once resolved
        if not isinstance(found, _SdkTracer):
            return None
    tracer = found
    try:
        is_enabled = getattr(tracer, "_is_enabled", None)
        if is_enabled is not None and not is_enabled():
            return None  # disabled by the tracer configurator: the SDK's own path
        if not _only_on_end(tracer.span_processor):
            return None
        tracer._span_limits  # noqa: B018  (present: read at the span's end)
        tracer._instrumentation_scope  # noqa: B018
    except AttributeError:
        return None
    return tracer


class DeferredSpan(trace.Span):
    """The task's recording span until it ends: buffers what is set on it; at ``end()``
    one SDK ``ReadableSpan`` goes to the provider's span processor's ``on_end``.

    Safe to use from several threads until it ends; after that, calls are ignored (the
    SDK would log a warning and ignore them too)."""

    __slots__ = (
        "_attributes",
        "_context",
        "_end_metrics",
        "_ended",
        "_events",
        "_kind",
        "_links",
        "_lock",
        "_name",
        "_parent",
        "_sets",
        "_start_time",
        "_status",
        "_tracer",
    )

    def __init__(
        self,
        tracer: Any,
        name: str,
        *,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: types.Attributes,
        links: Sequence[Link],
        end_metrics: Any,
    ) -> None:
        self._tracer = tracer
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes = attributes  # the sampler's, as the SDK starts its span with
        self._sets: list[tuple[str, Any]] = []  # set after the start, in order
        self._events: list[tuple[str, Any, int]] = []
        self._links = links
        self._status = _UNSET
        self._lock = threading.Lock()
        self._ended = False
        self._end_metrics = end_metrics
        self._start_time = time_ns()

    def __repr__(self) -> str:
        return f'DeferredSpan(name="{self._name}", context={self._context})'

    def get_span_context(self) -> SpanContext:
        return self._context

    @property
    def start_time(self) -> int:
        """Nanoseconds since the epoch, as the SDK span's ``start_time``."""
        return self._start_time

    def is_recording(self) -> bool:
        return not self._ended

    def set_attribute(self, key: str, value: types.AttributeValue) -> None:
        if isinstance(value, list):  # the SDK copies sequences when set
            value = tuple(value)
        with self._lock:
            if not self._ended:
                self._sets.append((key, value))

    def set_attributes(self, attributes: Mapping[str, types.AttributeValue]) -> None:
        items = [(k, tuple(v) if isinstance(v, list) else v) for k, v in attributes.items()]
        with self._lock:
            if not self._ended:
                self._sets.extend(items)

    def add_event(
        self, name: str, attributes: types.Attributes = None, timestamp: int | None = None
    ) -> None:
        stamp = timestamp if timestamp is not None else time_ns()
        copied = dict(attributes) if attributes else None
        with self._lock:
            if not self._ended:
                self._events.append((name, copied, stamp))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        link = Link(context, dict(attributes) if attributes else None)
        with self._lock:
            if not self._ended:
                self._links = (*self._links, link)

    def update_name(self, name: str) -> None:
        with self._lock:
            if not self._ended:
                self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # As the SDK: OK is final, UNSET is ignored.
        with self._lock:
            if self._ended or self._status.status_code is StatusCode.OK:
                return
            if isinstance(status, Status):
                if status.status_code is not StatusCode.UNSET:
                    self._status = status
            elif status is not StatusCode.UNSET:
                self._status = Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        # The installed SDK's own event shape (it calls self.add_event).
        _SdkSpan.record_exception(self, exception, attributes, timestamp, escaped)  # type: ignore[arg-type]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        if exc_val is not None and self.is_recording():  # as the SDK span's __exit__
            self.record_exception(exc_val, escaped=True)
            self.set_status(Status(StatusCode.ERROR, f"{type(exc_val).__name__}: {exc_val}"))
        self.end()

    def end(self, end_time: int | None = None) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
            end = end_time if end_time is not None else time_ns()
        tracer = self._tracer
        readable = self._readable(tracer, end)
        if self._end_metrics is not None:
            self._end_metrics()
        tracer.span_processor.on_end(readable)

    def _readable(self, tracer: Any, end_time: int) -> ReadableSpan:
        """The span the SDK would hand to ``on_end``: limits applied as it applies them."""
        limits = tracer._span_limits
        attributes = _bounded(
            limits.max_span_attributes,
            self._attributes,
            self._sets,
            limits.max_span_attribute_length,
        )
        events: Sequence[Event] = ()  # none: what the SDK's empty list reads as
        if self._events:
            bounded_events: BoundedList[Event] = BoundedList(limits.max_events)
            events = bounded_events
            for name, event_attributes, stamp in self._events:
                bounded_events.append(
                    Event(
                        name,
                        _bounded(
                            limits.max_event_attributes,
                            event_attributes,
                            (),
                            limits.max_attribute_length,
                        ),
                        stamp,
                    )
                )
        return ReadableSpan(
            name=self._name,
            context=self._context,
            parent=self._parent,
            resource=tracer.resource,
            attributes=attributes,
            events=events,
            links=_bounded_links(self._links, limits) if self._links else (),
            kind=self._kind,
            status=self._status,
            start_time=self._start_time,
            end_time=end_time,
            instrumentation_info=tracer.instrumentation_info,
            instrumentation_scope=tracer._instrumentation_scope,
        )


def _bounded_links(links: Sequence[Link], limits: Any) -> Any:
    """The SDK span's links: valid ones, their attributes and their count bounded."""
    valid = []
    for link in links:
        context = link.context
        if link and context and (context.is_valid or link.attributes or context.trace_state):
            valid.append(
                Link(
                    context,
                    BoundedAttributes(
                        limits.max_link_attributes,
                        link.attributes,
                        max_value_len=limits.max_attribute_length,
                        immutable=True,
                    ),
                )
            )
    return BoundedList.from_seq(limits.max_links, valid)


def _bounded(
    maxlen: int | None,
    first: types.Attributes,
    later: Sequence[tuple[str, Any]],
    max_value_len: int | None,
) -> BoundedAttributes:
    """``first`` then each of ``later`` set, in order, into the SDK's ``BoundedAttributes``
    (ended: immutable), as an SDK span sets them.

    Fast path, when the result cannot differ from setting them one by one: every key a
    non-empty ``str``, every value a plain ``str`` (within ``max_value_len``), ``bool``,
    ``int`` or ``float`` (nothing the SDK's cleaning would change, warn about or drop),
    and no more distinct keys than ``maxlen`` (nothing evicted): the mapping is filled
    directly. Anything else goes through ``BoundedAttributes`` itself."""
    if _FAST_ATTRIBUTES:
        merged: dict[str, Any] = {}
        for key, value in chain(first.items() if first else (), later):
            if type(key) is not str or not key:
                break
            kind = type(value)
            if kind is str:
                if max_value_len is not None and len(value) > max_value_len:
                    break
            elif kind not in _PLAIN:
                break
            merged.pop(key, None)  # set again: moves to the end, as in BoundedAttributes
            merged[key] = value
        else:
            if maxlen is None or len(merged) <= maxlen:
                attributes = BoundedAttributes(
                    maxlen, None, immutable=True, max_value_len=max_value_len
                )
                attributes._dict = merged
                return attributes
    attributes = BoundedAttributes(maxlen, first, immutable=False, max_value_len=max_value_len)
    for key, value in later:
        attributes[key] = value
    attributes._immutable = True
    return attributes


def _fast_attributes_hold() -> bool:
    """Whether the installed ``BoundedAttributes`` keeps its items as ``_bounded``'s fast
    path assumes (checked once, against the class itself)."""
    global _FAST_ATTRIBUTES  # noqa: PLW0603 - set once, at import
    if _SdkTracer is None:  # pragma: no cover
        return False
    first: dict[str, types.AttributeValue] = {"a": "x", "b": True, "c": 1, "d": 1.5}
    later = [("a", "y"), ("e", "z")]
    try:
        slow = BoundedAttributes(8, first, immutable=False, max_value_len=4)
        for key, value in later:
            slow[key] = value
        slow._immutable = True
        _FAST_ATTRIBUTES = True
        fast = _bounded(8, first, later, 4)
        return (
            type(fast._dict) is type(slow._dict)
            and list(fast.items()) == list(slow.items())
            and fast.dropped == slow.dropped == 0
            and fast.maxlen == slow.maxlen
            and fast.max_value_len == slow.max_value_len
            and fast._immutable is slow._immutable is True
        )
    except Exception:  # pragma: no cover - an SDK shaped otherwise: the slow path
        return False


_FAST_ATTRIBUTES = False
_FAST_ATTRIBUTES = _fast_attributes_hold()


def _sdk_links_default() -> tuple[()] | None:
    """What the installed SDK's ``start_span`` hands its sampler for ``links=None``: ``()``
    (newer SDKs) or None (older ones pass it on). Asked of the SDK itself, once: a
    throwaway provider whose sampler notes what it gets and drops the span."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

    seen: list[Any] = []

    class _Noting(Sampler):
        def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
            seen.append(kwargs.get("links", args[5] if len(args) > 5 else None))
            return SamplingResult(Decision.DROP)

        def get_description(self) -> str:
            return "taskscope-links-probe"

    try:
        provider = TracerProvider(sampler=_Noting(), shutdown_on_exit=False)
        provider.get_tracer("probe").start_span("probe", links=None)
    except Exception:  # pragma: no cover - then the newer SDKs' behaviour
        return ()
    return None if seen and seen[0] is None else ()


_SDK_LINKS_DEFAULT = _sdk_links_default() if _SdkTracer is not None else ()


def _start_deferred(
    tracer: Any,
    name: str,
    *,
    context: Context | None,
    kind: SpanKind,
    attributes: types.Attributes,
    links: Sequence[Link] | None,
) -> Span:
    """``Tracer.start_span``'s decisions, in its order, without the SDK span."""
    if not links and _SDK_LINKS_DEFAULT is not None:
        links = _SDK_LINKS_DEFAULT  # what the installed SDK hands its sampler for none
    parent = trace.get_current_span(context).get_span_context()
    if parent is not None and not isinstance(parent, SpanContext):
        msg = "parent_span_context must be a SpanContext or None."  # as the SDK raises
        raise TypeError(msg)
    if parent is None or not parent.is_valid:
        parent_context = None
        trace_id = tracer.id_generator.generate_trace_id()
    else:
        parent_context = parent
        trace_id = parent.trace_id
    result = tracer.sampler.should_sample(context, trace_id, name, kind, attributes, links)
    decision = result.decision
    flags = _SAMPLED if decision.is_sampled() else _NOT_SAMPLED
    if _RANDOM_TRACE_ID is not None:
        if parent_context is None:
            is_random = getattr(tracer.id_generator, "is_trace_id_random", None)
            random_id = bool(is_random()) if is_random is not None else False
        else:
            random_id = bool(getattr(parent_context.trace_flags, "random_trace_id", False))
        if random_id:
            flags = _RANDOM_SAMPLED if flags is _SAMPLED else _RANDOM_NOT_SAMPLED
    span_context = SpanContext(
        trace_id,
        tracer.id_generator.generate_span_id(),
        is_remote=False,
        trace_flags=flags,
        trace_state=result.trace_state,
    )
    metrics = getattr(tracer, "_tracer_metrics", None)  # the SDK's own span metrics (newer)
    end_metrics = metrics.start_span(parent_context, decision) if metrics is not None else None
    if not decision.is_recording():
        return trace.NonRecordingSpan(span_context)
    return DeferredSpan(
        tracer,
        name,
        context=span_context,
        parent=parent_context,
        kind=kind,
        attributes=result.attributes,
        links=links or (),
        end_metrics=end_metrics,
    )


# -- the task span, as run_one and the queue workers use it ---------------------------------
def _adopt_span(run: TaskRun, span: Span) -> None:
    """FastAPI's task span: its ids for metrics and logs, events added, the rest FastAPI's."""
    run.span = span
    run.owns_span = False
    span_context = span.get_span_context()
    if span_context.is_valid:
        run.trace_id = format(span_context.trace_id, "032x")
        run.span_id = format(span_context.span_id, "016x")


def _start_span(runtime: Runtime, run: TaskRun, cap: Capture, sync: bool, wait: float) -> object:
    """Start the task's span and make it current; returns the context token (or None)."""
    span, token = start_task_span(
        runtime, run.name, cap.context, kind=SpanKind.INTERNAL, sync=sync, wait=wait
    )
    if span is not None:
        span_context = span.get_span_context()
        if span_context.is_valid:
            run.trace_id = format(span_context.trace_id, "032x")
            run.span_id = format(span_context.span_id, "016x")
        run.span = span
    return token


def start_task_span(
    runtime: Runtime,
    name: str,
    parent: Context,
    *,
    kind: SpanKind,
    sync: bool,
    wait: float,
    attributes: Mapping[str, Any] | None = None,
) -> tuple[Span | None, object]:
    """``background_task {name}`` under ``parent`` (or, in link mode, a new trace linked
    to it), made current; (span, context token), or (None, None) when tracing is off or
    failed (absorbed). A deferred span with the SDK's tracer (see the module docstring)."""
    try:
        tracer = runtime.tracer
        if tracer is None:
            return None, None
        context: Context | None = parent
        links: list[Link] | None = None
        if runtime.telemetry.span_mode == "link":
            remote = trace.get_current_span(parent).get_span_context()
            links = [Link(remote)] if remote.is_valid else None
            context = otel_context.Context()
        span_name = f"background_task {name}"
        span_attributes = {
            "code.function.name": name,
            "taskscope.task.sync": sync,
            "taskscope.task.wait": wait,  # seconds
            **(attributes or {}),
        }
        sdk = _sdk_tracer(tracer)
        span: Span
        if sdk is not None:
            span = _start_deferred(
                sdk,
                span_name,
                context=context,
                kind=kind,
                attributes=span_attributes,
                links=links,
            )
        else:
            span = tracer.start_span(
                span_name, context=context, kind=kind, attributes=span_attributes, links=links
            )
        return span, otel_context.attach(trace.set_span_in_context(span, parent))
    except Exception:
        runtime.absorb("tracing")
        return None, None


def _end_span(
    runtime: Runtime,
    run: TaskRun,
    token: object,
    outcome: Outcome,
    error: BaseException | None,
) -> None:
    if run.span is not None:
        finish_span(
            runtime,
            run.span,
            token,
            outcome,
            error,
            error_type=run.error_type,
            message=run.error_message,
        )


def finish_span(
    runtime: Runtime,
    span: Span,
    token: object,
    outcome: Outcome,
    error: BaseException | None,
    *,
    error_type: str | None = None,
    message: str | None = None,
) -> None:
    """Detach the span's context, set the outcome (and, on failure, ``error.type``, the
    exception event and ERROR status), then end it: each step absorbed on its own, so a
    failure in one never costs the span."""
    try:
        if token is not None:
            otel_context.detach(token)  # type: ignore[arg-type]
    except Exception:
        runtime.absorb("tracing")
    try:
        span.set_attribute("taskscope.task.outcome", outcome)
        if error is not None:
            error_type = error_type or qualified_type_name(error)
        if error is not None and outcome == "failure":
            span.set_attribute("error.type", error_type or "")
            span.add_event(
                "exception",
                {
                    "exception.type": error_type or "",
                    "exception.message": message or "",
                    "exception.stacktrace": safe_stacktrace(error, runtime.telemetry),
                },
            )
            span.set_status(Status(StatusCode.ERROR, error_type))
        elif error is not None:
            span.set_attribute("taskscope.task.interrupted_by", error_type or "")
    except Exception:
        runtime.absorb("tracing")
    try:  # whatever failed above, the span still ends
        span.end()
    except Exception:
        runtime.absorb("tracing")
