"""The deferred task span against the SDK span it stands for.

With the OpenTelemetry SDK's tracer, taskscope defers the task's span (``taskscope._spans``):
ids and sampling decided at the start, a lightweight span current during the task, one
``ReadableSpan`` handed to the span processor's ``on_end``. Each scenario here runs twice,
once deferred and once through ``Tracer.start_span`` (the reference), on providers with
the same deterministic id generator, so the two runs produce the same ids; what the span
processors receive must then be the same, field by field (times aside). Runs on the
oldest supported SDK too (``scripts/test-oldest-fastapi``).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from time import time_ns
from typing import Any, cast

import anyio
import anyio.lowlevel
import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from prometheus_client import CollectorRegistry

from taskscope import BackgroundTasks, Telemetry, _spans
from taskscope._runtime import runtime_of
from taskscope.testing import ListLogger

pytestmark = pytest.mark.anyio

RESOURCE = Resource.create({"service.name": "deferred-test", "deployment.environment": "t"})


class SeededIds(IdGenerator):
    """Deterministic ids: the deferred run and the reference draw the same sequence."""

    def __init__(self, seed: int = 7) -> None:
        self._random = random.Random(seed)

    def generate_span_id(self) -> int:
        return self._random.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        return self._random.getrandbits(128) or 1

    def is_trace_id_random(self) -> bool:  # newer SDKs flag random trace ids
        return True


class Ended(SpanProcessor):
    """Keeps what ``on_end`` receives, and ``on_start`` if ``starts`` (then it has its own
    ``on_start``, which turns the deferred span off)."""

    def __init__(self) -> None:
        self.ended: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.ended.append(span)


class Started(Ended):
    def __init__(self) -> None:
        super().__init__()
        self.started: list[Any] = []

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        self.started.append(span)


@dataclass
class Setup:
    provider: TracerProvider
    exporter: InMemorySpanExporter
    processor: Ended
    telemetry: Telemetry
    logs: ListLogger
    current: list[trace.Span] = field(default_factory=list)  # the tasks' current spans

    def exported(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def tasks(self) -> list[ReadableSpan]:
        return [s for s in self.exported() if s.name not in {"request", "inner"}]

    @property
    def tracer(self) -> trace.Tracer:
        return self.provider.get_tracer("app", "1.0")


def make(
    *,
    sampler: Sampler | None = None,
    limits: SpanLimits | None = None,
    processor: Ended | None = None,
    sdk_meter_provider: Any = None,
    **options: Any,
) -> Setup:
    more = {} if sdk_meter_provider is None else {"meter_provider": sdk_meter_provider}
    provider = TracerProvider(
        sampler=sampler or ParentBased(ALWAYS_ON),
        resource=RESOURCE,
        id_generator=SeededIds(),
        span_limits=limits or SpanLimits(),
        **more,
    )
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    processor = processor or Ended()
    provider.add_span_processor(processor)
    logs = ListLogger()
    options.setdefault("otel_metrics", False)
    telemetry = Telemetry(
        registry=CollectorRegistry(), tracer_provider=provider, logger=logs, **options
    )
    return Setup(provider, exporter, processor, telemetry, logs)


Scenario = Callable[[Setup], Awaitable[None]]


@contextmanager
def reference_spans() -> Iterator[None]:
    """Within: every tracer takes the public API path (SDK spans), as before deferral."""
    saved = _spans._sdk_tracer
    _spans._sdk_tracer = lambda tracer: None
    try:
        yield
    finally:
        _spans._sdk_tracer = saved


async def both(scenario: Scenario, *, deferred: bool = True, **options: Any) -> tuple[Setup, Setup]:
    """Run ``scenario`` deferred, then as the reference; each on its own provider (both
    from the same line, so sampled stacks that reach up here are alike)."""
    runs: list[Setup] = []
    for reference in (False, True):
        setup = make(**options)
        before = time_ns()
        with reference_spans() if reference else contextlib.nullcontext():
            await scenario(setup)
        setup.provider.force_flush()
        runs.append(setup)
        if reference:
            assert not any(isinstance(s, _spans.DeferredSpan) for s in setup.current)
            break
        after = time_ns()
        for span in (*setup.exported(), *setup.processor.ended):  # times: the span's own
            assert span.start_time is not None
            assert span.end_time is not None
            assert before <= span.start_time <= span.end_time <= after
        if deferred:  # the deferred span really served the run
            assert any(isinstance(s, _spans.DeferredSpan) for s in setup.current), setup.current
        # Let the loop probe's heartbeat run before the reference: two stalls with no beat
        # between them are one stall to the probe (blamed on the first task, see README).
        await anyio.sleep(0.05)
    ours, reference_run = runs
    return ours, reference_run


def shape(span: ReadableSpan) -> dict[str, Any]:
    """Everything a processor or exporter reads from a span, times and durations aside."""
    data: dict[str, Any] = json.loads(span.to_json())
    assert span.start_time is not None
    assert span.end_time is not None
    assert span.start_time <= span.end_time
    for key in ("start_time", "end_time"):
        data.pop(key)
    attributes = data["attributes"]
    if "taskscope.task.wait" in attributes:  # seconds: the clock's, differs per run
        assert isinstance(span.attributes["taskscope.task.wait"], float)  # type: ignore[index]
        attributes["taskscope.task.wait"] = "float"
    for event, original in zip(data["events"], span.events, strict=True):
        assert span.start_time <= original.timestamp <= span.end_time
        event.pop("timestamp")
        for key in ("taskscope.block.duration", "taskscope.task.age"):
            if key in event["attributes"]:
                event["attributes"][key] = type(event["attributes"][key]).__name__
    context = span.get_span_context()
    assert context is not None
    parent = span.parent
    scope = span.instrumentation_scope
    info = span._instrumentation_info  # the deprecated property warns
    data["more"] = {
        "flags": int(context.trace_flags),
        "is_remote": context.is_remote,
        "parent": None if parent is None else (parent.is_remote, int(parent.trace_flags)),
        "dropped": (span.dropped_attributes, span.dropped_events, span.dropped_links),
        "event_dropped": [e.dropped_attributes for e in span.events],
        "event_types": [type(e).__name__ for e in span.events],
        "link_attributes": [
            (dict(link.attributes or {}), getattr(link, "dropped_attributes", 0))
            for link in span.links
        ],
        "status": (span.status.status_code, span.status.description),
        "kind": span.kind,
        "resource": span.resource is not None and span.resource.attributes == RESOURCE.attributes,
        "scope": None
        if scope is None
        else (
            scope.name,
            scope.version,
            scope.schema_url,
            dict(getattr(scope, "attributes", None) or {}),
        ),
        "info": None if info is None else (info.name, info.version, info.schema_url),
        "type": type(span).__name__,
    }
    return data


def assert_same(ours: Sequence[ReadableSpan], reference: Sequence[ReadableSpan]) -> None:
    assert [s.name for s in ours] == [s.name for s in reference]
    for mine, theirs in zip(ours, reference, strict=True):
        assert shape(mine) == shape(theirs)


def noting(setup: Setup, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func``, noting the span current inside it (sync or async)."""
    if inspect.iscoroutinefunction(func):

        async def run_async(*args: Any) -> Any:
            setup.current.append(trace.get_current_span())
            return await func(*args)

        run_async.__qualname__ = func.__qualname__
        return run_async

    def run_sync(*args: Any) -> Any:
        setup.current.append(trace.get_current_span())
        return func(*args)

    run_sync.__qualname__ = func.__qualname__
    return run_sync


async def run(
    setup: Setup,
    *funcs: Callable[..., Any],
    parent: Context | None = None,
    request: bool = True,
) -> None:
    """Add ``funcs`` in a request span (or under ``parent``), then run them."""
    tasks = BackgroundTasks(telemetry=setup.telemetry)
    token = otel_context.attach(parent) if parent is not None else None
    try:
        if request:
            with setup.tracer.start_as_current_span("request", kind=SpanKind.SERVER):
                for func in funcs:
                    tasks.add_task(noting(setup, func))
        else:
            for func in funcs:
                tasks.add_task(noting(setup, func))
    finally:
        if token is not None:
            otel_context.detach(token)
    with suppress(Exception):
        await tasks()


# -- the tasks ---------------------------------------------------------------------------
async def ok_async() -> None:
    await anyio.lowlevel.checkpoint()


def ok_sync() -> None:
    pass


async def fails() -> None:
    raise KeyError("x" * 300)


async def uses_its_span(tracer: trace.Tracer) -> None:
    """What a task may do with ``trace.get_current_span()``."""
    span = trace.get_current_span()
    assert span.is_recording()
    span.set_attribute("user.list", [1, 2, 3])
    span.set_attribute("user.text", "t" * 40)
    span.set_attributes({"user.flag": True, "user.number": 1.5})
    span.set_attribute("user.text", "replaced")  # moves to the end, as in the SDK
    span.set_attribute("", "invalid key")
    span.set_attribute("user.none", cast(Any, None))
    span.set_attribute("user.object", {1, 2})  # type: ignore[arg-type]
    span.add_event("user.event", {"a": 1, "b": ["x", "y"], "c": "long" * 20})
    span.add_event("user.bare")
    span.add_link(SpanContext(0xABC, 0xDEF, is_remote=True), {"link.attr": "v"})
    span.add_link(SpanContext(0xABD, 0xDEE, is_remote=True))
    span.record_exception(ValueError("recorded"), {"extra": 1})
    span.update_name("renamed by the task")
    with tracer.start_as_current_span("inner"):
        pass
    span.set_status(Status(StatusCode.OK))
    raise RuntimeError("after OK: the status stays OK")


async def sets_status_by_code() -> None:
    span = trace.get_current_span()
    span.set_status(StatusCode.UNSET)  # ignored
    span.set_status(StatusCode.ERROR, "by code")


# -- the scenarios ------------------------------------------------------------------------
async def test_success_async_and_sync() -> None:
    async def scenario(setup: Setup) -> None:
        await run(setup, ok_async, ok_sync)

    ours, reference = await both(scenario)
    assert len(ours.exported()) == 3
    assert_same(ours.exported(), reference.exported())
    assert_same(ours.processor.ended, reference.processor.ended)
    (request, task, _sync) = ours.exported()
    assert type(task) is ReadableSpan
    assert task.parent is not None
    assert task.parent.span_id == request.context.span_id


async def test_failure_with_its_exception_event() -> None:
    async def scenario(setup: Setup) -> None:
        await run(setup, fails)

    ours, reference = await both(scenario)
    (task,) = ours.tasks()
    assert task.status.status_code is StatusCode.ERROR
    assert [e.name for e in task.events] == ["exception"]
    assert_same(ours.exported(), reference.exported())


async def test_cancellation() -> None:
    async def scenario(setup: Setup) -> None:
        started = anyio.Event()

        async def slow() -> None:
            started.set()
            await anyio.sleep(10)

        async with anyio.create_task_group() as group:
            group.start_soon(run, setup, slow)
            await started.wait()
            group.cancel_scope.cancel()

    ours, reference = await both(scenario)
    (task,) = ours.tasks()
    assert dict(task.attributes or {})["taskscope.task.outcome"] == "cancelled"
    assert_same(ours.exported(), reference.exported())


async def test_link_mode() -> None:
    async def scenario(setup: Setup) -> None:
        await run(setup, ok_async)

    ours, reference = await both(scenario, span_mode="link")
    (request, task) = ours.exported()
    assert task.parent is None
    assert [link.context.span_id for link in task.links] == [request.context.span_id]
    assert_same(ours.exported(), reference.exported())


async def test_what_the_task_does_with_its_span() -> None:
    """set_attribute(s), add_event, add_link, record_exception, update_name, set_status
    and a child span, from inside the task: the same span, the SDK's rules applied."""

    async def task(setup: Setup) -> None:
        async def uses(tracer: trace.Tracer = setup.tracer) -> None:
            await uses_its_span(tracer)

        await run(setup, uses)
        await run(setup, sets_status_by_code)

    ours, reference = await both(task)
    spans = ours.exported()
    assert [s.name for s in spans][:3] == ["request", "inner", "renamed by the task"]
    (_request, inner, renamed, _request2, by_code) = spans
    assert (by_code.status.status_code, by_code.status.description) == (
        StatusCode.ERROR,
        "by code",
    )
    assert inner.parent is not None
    assert inner.parent.span_id == renamed.context.span_id
    assert renamed.status.status_code is StatusCode.OK
    assert len(renamed.links) == 2
    assert_same(spans, reference.exported())


TINY = SpanLimits(
    max_span_attributes=3,
    max_span_attribute_length=6,
    max_events=2,
    max_event_attributes=2,
    max_attribute_length=4,
    max_links=1,
    max_link_attributes=1,
)
SHORT = SpanLimits(max_span_attribute_length=6, max_attribute_length=4)  # lengths only


@pytest.mark.parametrize("link_mode", [False, True])
@pytest.mark.parametrize("limits", [TINY, SHORT], ids=["tiny", "short"])
async def test_span_limits(link_mode: bool, limits: SpanLimits) -> None:
    """Attributes, events, links and their attributes bounded and counted as dropped;
    string values cut to the length limits."""

    async def scenario(setup: Setup) -> None:
        async def uses(tracer: trace.Tracer = setup.tracer) -> None:
            await uses_its_span(tracer)

        await run(setup, uses)
        await run(setup, fails)

    options: dict[str, Any] = {"span_mode": "link"} if link_mode else {}
    ours, reference = await both(scenario, limits=limits, **options)
    spans = ours.exported()
    tasks = [s for s in spans if s.name in {"renamed by the task", "background_task " + _n(fails)}]
    assert len(tasks) == 2
    for span in tasks:
        assert all(len(v) <= 6 for v in (span.attributes or {}).values() if isinstance(v, str))
        for event in span.events:
            assert all(len(v) <= 4 for v in (event.attributes or {}).values() if isinstance(v, str))
        if limits is TINY:
            assert span.dropped_attributes > 0
            assert len(span.attributes or {}) == 3
    if limits is TINY:
        assert tasks[0].dropped_events > 0
        assert tasks[0].dropped_links > 0
    assert_same(spans, reference.exported())


def _n(func: Callable[..., Any]) -> str:
    return f"{func.__module__}.{func.__qualname__}"


async def test_a_loop_blocked_event() -> None:
    async def blocks() -> None:
        await anyio.lowlevel.checkpoint()
        time.sleep(0.25)
        await anyio.lowlevel.checkpoint()

    async def scenario(setup: Setup) -> None:
        await run(setup, blocks)

    ours, reference = await both(scenario, block_threshold=0.05)
    for setup in (ours, reference):
        (task,) = setup.tasks()
        assert [e.name for e in task.events] == ["loop.blocked"]
    assert_same(ours.exported(), reference.exported())


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_task_hung_event_from_the_watchdog_thread() -> None:
    """``task.hung`` is added by the watchdog thread while the task waits."""

    async def scenario(setup: Setup) -> None:
        clock = setup.telemetry.clock
        assert isinstance(clock, FakeClock)
        entered = anyio.Event()
        release = anyio.Event()

        async def waits() -> None:
            entered.set()
            await release.wait()

        async with anyio.create_task_group() as group:
            group.start_soon(run, setup, waits)
            await entered.wait()
            clock.now += 1.0
            deadline = time.perf_counter() + 5
            while not setup.logs.named("task.hung"):
                assert time.perf_counter() < deadline, "no task.hung"
                await anyio.sleep(0.005)
            release.set()

    ours = make(clock=FakeClock(), hung_after=1.0)
    await scenario(ours)
    reference = make(clock=FakeClock(), hung_after=1.0)
    with reference_spans():
        await scenario(reference)
    assert isinstance(ours.current[0], _spans.DeferredSpan)
    for setup in (ours, reference):
        (task,) = setup.tasks()
        assert [e.name for e in task.events] == ["task.hung"]
    assert_same(ours.exported(), reference.exported())


# -- sampling ----------------------------------------------------------------------------
async def test_sampler_off() -> None:
    """Dropped: nothing exported, the current span non-recording with the SDK's context."""

    async def scenario(setup: Setup) -> None:
        await run(setup, ok_async, ok_sync)

    ours, reference = await both(scenario, deferred=False, sampler=ALWAYS_OFF)
    assert ours.exported() == reference.exported() == []
    assert ours.processor.ended == reference.processor.ended == []
    for mine, theirs in zip(ours.current, reference.current, strict=True):
        assert type(mine) is type(theirs) is NonRecordingSpan
        assert not mine.is_recording()
        assert mine.get_span_context() == theirs.get_span_context()


async def test_ratio_sampler_on_root_tasks() -> None:
    """TraceIdRatioBased: the same trace ids kept and dropped, the same flags."""

    async def scenario(setup: Setup) -> None:
        await run(setup, *([ok_async] * 24), request=False)

    ours, reference = await both(scenario, sampler=TraceIdRatioBased(0.5))
    assert 0 < len(ours.exported()) < 24
    assert_same(ours.exported(), reference.exported())
    assert [s.get_span_context() for s in ours.current] == [
        s.get_span_context() for s in reference.current
    ]
    assert [type(s).__name__ for s in ours.current].count("NonRecordingSpan") == 24 - len(
        ours.exported()
    )


async def test_parent_based_on_remote_parents() -> None:
    """ParentBased(ALWAYS_OFF): a sampled remote parent's task is kept, the other dropped;
    the parent's trace state carries over."""

    def remote(flags: int) -> Context:
        context = SpanContext(
            0x1234,
            0x5678 + flags,
            is_remote=True,
            trace_flags=TraceFlags(flags),
            trace_state=TraceState([("vendor", "v1")]),
        )
        return trace.set_span_in_context(NonRecordingSpan(context))

    async def scenario(setup: Setup) -> None:
        await run(setup, ok_async, parent=remote(TraceFlags.SAMPLED), request=False)
        await run(setup, ok_async, parent=remote(TraceFlags.DEFAULT), request=False)

    ours, reference = await both(scenario, sampler=ParentBased(ALWAYS_OFF))
    (kept,) = ours.exported()
    assert kept.parent is not None
    assert kept.parent.span_id == 0x5678 + TraceFlags.SAMPLED
    assert kept.context.trace_state == TraceState([("vendor", "v1")])
    assert_same(ours.exported(), reference.exported())
    assert [s.get_span_context() for s in ours.current] == [
        s.get_span_context() for s in reference.current
    ]


class RecordOnly(Sampler):
    """RECORD_ONLY, with attributes and a trace state of its own."""

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Any = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        merged = {**(attributes or {}), "sampler.said": "record only"}
        return SamplingResult(Decision.RECORD_ONLY, merged, TraceState([("s", "1")]))

    def get_description(self) -> str:
        return "RecordOnly"


async def test_record_only_reaches_on_end_unsampled() -> None:
    recording: list[bool] = []

    async def fails_recording() -> None:
        recording.append(trace.get_current_span().is_recording())
        await fails()

    async def scenario(setup: Setup) -> None:
        await run(setup, fails_recording, request=False)

    ours, reference = await both(scenario, sampler=RecordOnly())
    assert recording == [True, True]
    assert ours.exported() == reference.exported() == []  # the exporting processor skips it
    (span,) = ours.processor.ended
    assert not span.context.trace_flags.sampled
    assert span.context.trace_state == TraceState([("s", "1")])
    assert dict(span.attributes or {})["sampler.said"] == "record only"
    assert_same(ours.processor.ended, reference.processor.ended)


# -- span processors, providers ----------------------------------------------------------
async def test_a_processor_with_on_start_gets_sdk_spans() -> None:
    """A processor with its own on_start: the task's span is the SDK's, started and ended
    through the tracer (on_start never sees a deferred span)."""
    processor = Started()
    setup = make(processor=processor)
    await run(setup, ok_async)
    (current,) = setup.current
    assert isinstance(current, SdkSpan)
    assert [s.name for s in processor.started] == ["request", "background_task " + _n(ok_async)]
    assert processor.started[1] is current
    assert [s.name for s in processor.ended] == [s.name for s in setup.exported()]


async def test_on_end_only_processor_never_sees_on_start() -> None:
    """The documented behaviour: on_end gets one ReadableSpan per task; on_start is not
    called for the task span (processors with an on_start of their own turn deferral off)."""
    calls: list[str] = []

    class OnEnd(Ended):
        def on_end(self, span: ReadableSpan) -> None:
            calls.append(span.name)
            super().on_end(span)

    setup = make(processor=OnEnd())
    await run(setup, ok_async)
    assert isinstance(setup.current[0], _spans.DeferredSpan)
    assert calls == ["request", "background_task " + _n(ok_async)]
    assert type(setup.processor.ended[1]) is ReadableSpan


async def test_an_on_start_set_on_the_instance_counts() -> None:
    started: list[Any] = []
    processor = Ended()
    processor.on_start = lambda span, parent_context=None: started.append(span)  # type: ignore[method-assign]
    setup = make(processor=processor)
    await run(setup, ok_async)
    assert isinstance(setup.current[0], SdkSpan)
    assert started[1] is setup.current[0]


async def test_a_processor_added_later_is_seen() -> None:
    setup = make()
    await run(setup, ok_async)
    processor = Started()
    setup.provider.add_span_processor(processor)
    await run(setup, ok_async)
    assert isinstance(setup.current[0], _spans.DeferredSpan)
    assert isinstance(setup.current[1], SdkSpan)


class RecordingTracer(trace.NoOpTracer):
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def start_span(self, name: str, *args: Any, **kwargs: Any) -> trace.Span:
        self.calls.append((name, kwargs))
        return NonRecordingSpan(SpanContext(0xAB, 0xCD, is_remote=False))


class RecordingProvider(trace.NoOpTracerProvider):
    def __init__(self) -> None:
        self.tracer = RecordingTracer()

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return self.tracer


async def test_a_non_sdk_provider_gets_the_public_api_call() -> None:
    provider = RecordingProvider()
    telemetry = Telemetry(
        registry=CollectorRegistry(), tracer_provider=provider, otel_metrics=False
    )
    tasks = BackgroundTasks(telemetry=telemetry)
    tasks.add_task(ok_async)
    await tasks()
    ((name, kwargs),) = provider.tracer.calls
    assert name == "background_task " + _n(ok_async)
    assert kwargs["kind"] is SpanKind.INTERNAL
    assert kwargs["links"] is None
    assert set(kwargs["attributes"]) == {
        "code.function.name",
        "taskscope.task.sync",
        "taskscope.task.wait",
    }
    assert runtime_of(telemetry).absorbed_errors == 0


async def test_the_noop_provider() -> None:
    telemetry = Telemetry(
        registry=CollectorRegistry(),
        tracer_provider=trace.NoOpTracerProvider(),
        otel_metrics=False,
    )
    tasks = BackgroundTasks(telemetry=telemetry)
    tasks.add_task(ok_async)
    await tasks()
    assert runtime_of(telemetry).absorbed_errors == 0


# -- failures absorbed, threads ----------------------------------------------------------
async def test_a_failing_processor_or_sampler_never_costs_the_task() -> None:
    class Raises(Ended):
        def on_end(self, span: ReadableSpan) -> None:
            raise RuntimeError("processor")

    class BadSampler(RecordOnly):
        def should_sample(self, *args: Any, **kwargs: Any) -> SamplingResult:
            raise RuntimeError("sampler")

    done: list[str] = []

    async def task() -> None:
        done.append("ran")

    for setup in (make(processor=Raises()), make(sampler=BadSampler())):
        tasks = BackgroundTasks(telemetry=setup.telemetry)
        tasks.add_task(task)
        await tasks()
        assert runtime_of(setup.telemetry).absorbed_errors == 1
    assert done == ["ran", "ran"]


async def test_events_from_threads_while_it_runs_none_after_it_ended() -> None:
    setup = make()
    threads_done = threading.Event()

    async def busy() -> None:
        span = trace.get_current_span()

        def add(n: int) -> None:
            for i in range(100):
                span.add_event(f"e{n}", {"i": i})
                span.set_attribute(f"t{n}", i)

        workers = [threading.Thread(target=add, args=(n,)) for n in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        threads_done.set()

    await run(setup, busy, request=False)
    assert threads_done.is_set()
    (span,) = setup.exported()
    assert len(span.events) + span.dropped_events == 400
    assert span.dropped_events == 400 - 128  # the SDK's default event limit
    assert {f"t{n}" for n in range(4)} <= set(span.attributes or {})
    assert dict(span.attributes or {})["t0"] == 99
    (current,) = setup.current
    assert not current.is_recording()
    current.add_event("late")
    current.set_attribute("late", 1)
    current.set_status(Status(StatusCode.ERROR))
    current.end()
    assert len(setup.exported()) == 1
    assert setup.exported()[0].status.status_code is StatusCode.UNSET


async def test_the_sdks_own_span_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Newer SDKs count started and live spans when asked to: the same counts."""
    if "_tracer_metrics" not in vars(TracerProvider().get_tracer("probe")):
        pytest.skip("this SDK has no span metrics of its own")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    monkeypatch.setenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")

    def points(reader: InMemoryMetricReader) -> dict[str, list[tuple[Any, ...]]]:
        data = reader.get_metrics_data()
        assert data is not None
        found: dict[str, list[tuple[Any, ...]]] = {}
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    found[metric.name] = sorted(
                        (tuple(sorted(dict(p.attributes or {}).items())), p.value)  # type: ignore[union-attr]
                        for p in metric.data.data_points
                    )
        return found

    async def scenario(setup: Setup) -> None:
        await run(setup, ok_async, fails)
        await run(setup, ok_async, request=False)

    readers = []
    for reference in (False, True):
        reader = InMemoryMetricReader()
        setup = make(
            sdk_meter_provider=MeterProvider(metric_readers=[reader]), sampler=RecordOnly()
        )
        if reference:
            with reference_spans():
                await scenario(setup)
        else:
            await scenario(setup)
            assert isinstance(setup.current[0], _spans.DeferredSpan)
        readers.append(reader)
    ours, theirs = (points(reader) for reader in readers)
    assert any(name.startswith("otel.sdk.span") for name in ours), ours
    assert ours == theirs


async def test_a_tracer_disabled_by_the_sdks_configurator() -> None:
    """Newer SDKs can disable a tracer: the SDK's own non-recording span, as before."""
    import opentelemetry.sdk.trace as sdk_trace

    disable = getattr(sdk_trace, "_disable_tracer_configurator", None)
    if disable is None:
        pytest.skip("this SDK has no tracer configurator")
    setup = make()
    setup.provider._set_tracer_configurator(tracer_configurator=disable)
    tasks = BackgroundTasks(telemetry=setup.telemetry)
    tasks.add_task(noting(setup, ok_async))
    await tasks()
    assert setup.exported() == []
    (current,) = setup.current
    assert type(current) is NonRecordingSpan
    assert runtime_of(setup.telemetry).absorbed_errors == 0


async def test_a_proxy_tracer_once_resolved_to_the_sdk() -> None:
    """The global provider's ProxyTracer (taskscope's tracer taken before the app set its
    provider): deferred once the proxy has resolved to an SDK tracer."""
    setup = make()
    proxy = trace.ProxyTracer("taskscope")
    proxy._real_tracer = setup.provider.get_tracer("taskscope")  # as resolved

    class Proxied(trace.NoOpTracerProvider):
        def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
            return proxy

    telemetry = Telemetry(
        registry=CollectorRegistry(), tracer_provider=Proxied(), otel_metrics=False
    )
    tasks = BackgroundTasks(telemetry=telemetry)
    tasks.add_task(noting(setup, ok_async))
    await tasks()
    assert isinstance(setup.current[0], _spans.DeferredSpan)
    (span,) = setup.exported()
    assert span.name == "background_task " + _n(ok_async)


class Recording(Sampler):
    """ALWAYS_ON that keeps what it is asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[Any, ...]] = []

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Any = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        self.asked.append(
            (
                parent.span_id,
                trace_id,
                name,
                kind,
                {k: v for k, v in (attributes or {}).items() if k != "taskscope.task.wait"},
                None if links is None else [(type(links), link.context) for link in links],
                trace_state,
            )
        )
        return ALWAYS_ON.should_sample(parent_context, trace_id, name, kind, attributes, links)

    def get_description(self) -> str:
        return "Recording"


@pytest.mark.parametrize("span_mode", ["child", "link"])
async def test_the_sampler_is_asked_what_the_sdk_asks(span_mode: str) -> None:
    async def scenario(setup: Setup) -> None:
        await run(setup, ok_async, ok_sync)

    samplers = []
    for reference in (False, True):
        sampler = Recording()
        setup = make(sampler=sampler, span_mode=span_mode)
        if reference:
            with reference_spans():
                await scenario(setup)
        else:
            await scenario(setup)
            assert isinstance(setup.current[0], _spans.DeferredSpan)
        samplers.append(sampler)
    ours, theirs = samplers
    assert len(ours.asked) == 3  # the request span and the two tasks
    assert ours.asked == theirs.asked


async def test_the_concurrent_multi_span_processor() -> None:
    """The provider's other active processor: each processor's on_end gets the span."""
    from opentelemetry.sdk.trace import ConcurrentMultiSpanProcessor

    active = ConcurrentMultiSpanProcessor(num_threads=2)
    provider = TracerProvider(active_span_processor=active, resource=RESOURCE)
    first, second = Ended(), Ended()
    provider.add_span_processor(first)
    provider.add_span_processor(second)
    telemetry = Telemetry(
        registry=CollectorRegistry(), tracer_provider=provider, otel_metrics=False
    )
    current: list[trace.Span] = []

    async def task() -> None:
        current.append(trace.get_current_span())

    tasks = BackgroundTasks(telemetry=telemetry)
    tasks.add_task(task)
    await tasks()
    provider.shutdown()
    assert isinstance(current[0], _spans.DeferredSpan)
    assert [s.name for s in first.ended] == [s.name for s in second.ended]
    (span,) = first.ended
    assert span.resource.attributes == RESOURCE.attributes
    assert second.ended[0] is span
