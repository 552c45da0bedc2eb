"""The ways of running background tasks that the benchmarks compare.

Each variant gives a factory of ``BackgroundTasks``-like objects (``add_task`` + ``await``):

plain              Starlette's ``BackgroundTasks``, no telemetry
ts-metrics         taskscope, Prometheus metrics + logs, no spans, loop probe on (default)
ts-metrics-noprobe taskscope, as above with ``loop_probe=False``
ts-full            taskscope, spans (SDK provider, BatchSpanProcessor, dropping exporter)
                   + Prometheus metrics + loop probe
hand               a hand-written decorator on the task functions: OTel span + Prometheus
                   histogram + failure counter (what teams write instead)
(diagnostic, on request: ts-bare = taskscope with every signal off; otel-span = one SDK
span per task with taskscope's attributes, nothing else: async tasks only;
ts-metrics-unbatched = ts-metrics with every success recorded as it happens, as before the
batched hot path; ts-full-sdkspan =
ts-full with a regular SDK span per task, as before the deferred span)
fastapi-native     FastAPI's own ``background_task`` spans (``FastAPI(telemetry=...)``)

Every variant gets its own ``CollectorRegistry`` and tracer provider. OTel metrics of
taskscope go to the (no-op) global meter provider in every variant, as with an app that
configured none.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.util.types import AttributeValue
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.background import BackgroundTasks as StarletteBackgroundTasks

from common import dropping_tracer_provider

F = TypeVar("F", bound=Callable[..., Any])

VARIANTS = (
    "plain",
    "ts-metrics",
    "ts-metrics-noprobe",
    "ts-full",
    "hand",
    "fastapi-native",
)


def hand_wrapper(registry: CollectorRegistry, provider: TracerProvider) -> Callable[[F], F]:
    """What a team writes by hand instead of taskscope: a decorator for task functions."""
    tracer = provider.get_tracer("hand")
    duration = Histogram("bg_task_seconds", "Task run time.", ["task"], registry=registry)
    failures = Counter("bg_task_failures", "Task failures.", ["task", "error"], registry=registry)

    def observe(func: F) -> F:
        name = f"{func.__module__}.{func.__qualname__}"
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                with tracer.start_as_current_span(f"background_task {name}"):
                    start = time.perf_counter()
                    try:
                        return await func(*args, **kwargs)
                    except Exception as exc:
                        failures.labels(name, type(exc).__name__).inc()
                        raise
                    finally:
                        duration.labels(name).observe(time.perf_counter() - start)

            return run_async  # type: ignore[return-value]

        @functools.wraps(func)
        def run_sync(*args: Any, **kwargs: Any) -> Any:
            with tracer.start_as_current_span(f"background_task {name}"):
                start = time.perf_counter()
                try:
                    return func(*args, **kwargs)
                except Exception as exc:
                    failures.labels(name, type(exc).__name__).inc()
                    raise
                finally:
                    duration.labels(name).observe(time.perf_counter() - start)

        return run_sync  # type: ignore[return-value]

    return observe


def span_only(provider: TracerProvider) -> Callable[[F], F]:
    """One SDK span per task with taskscope's attributes: the floor of any traced variant."""
    tracer = provider.get_tracer("floor")

    def observe(func: F) -> F:
        name = f"{func.__module__}.{func.__qualname__}"
        if not inspect.iscoroutinefunction(func):
            return func  # async tasks only (sync figures of this variant are plain's)

        @functools.wraps(func)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            attributes: dict[str, AttributeValue] = {
                "code.function.name": name,
                "taskscope.task.sync": False,
                "taskscope.task.wait_s": 0.0,
            }
            with tracer.start_as_current_span(f"background_task {name}", attributes=attributes):
                return await func(*args, **kwargs)

        return run_async  # type: ignore[return-value]

    return observe


class Variant:
    """One variant's settings: ``new()`` makes a tasks object, ``enter()`` a request scope."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.registry = CollectorRegistry()
        self.provider: TracerProvider | None = None
        self._context: Any = None
        self.new: Callable[[], Any]
        self.task: Callable[[F], F] = _same
        self._sdk_span = False  # ts-full-sdkspan: taskscope's span through Tracer.start_span
        self._saved: Any = None
        if name == "plain":
            self.new = StarletteBackgroundTasks
        elif name.startswith("ts-"):
            from taskscope import BackgroundTasks, Telemetry

            if name in {"ts-full", "ts-full-sdkspan"}:
                self.provider = dropping_tracer_provider()
                self._sdk_span = name == "ts-full-sdkspan"
                telemetry = Telemetry(registry=self.registry, tracer_provider=self.provider)
            elif name == "ts-bare":  # diagnostic: taskscope's own bookkeeping, no signals
                telemetry = Telemetry(
                    registry=self.registry,
                    prometheus=False,
                    otel_metrics=False,
                    span_mode="off",
                    loop_probe=False,
                )
            else:
                telemetry = Telemetry(
                    registry=self.registry,
                    span_mode="off",
                    loop_probe=name in {"ts-metrics", "ts-metrics-unbatched"},
                )
                if name == "ts-metrics-unbatched":  # diagnostic: the per-task record path
                    from taskscope._runtime import runtime_of

                    runtime_of(telemetry).batching = False
            self.telemetry = telemetry
            self.new = lambda: BackgroundTasks(telemetry=telemetry)
        elif name == "hand":
            self.provider = dropping_tracer_provider()
            self.new = StarletteBackgroundTasks
            self.task = hand_wrapper(self.registry, self.provider)
        elif name == "otel-span":  # diagnostic: the span alone, as taskscope shapes it
            self.provider = dropping_tracer_provider()
            self.new = StarletteBackgroundTasks
            self.task = span_only(self.provider)
        elif name == "fastapi-native":
            # What FastAPI's request handling puts in the OTel context: the per-request
            # telemetry holding the tracer. fastapi.BackgroundTasks.__call__ then wraps every
            # task in `_operation("background_task")`. Private names (fastapi 0.165).
            from fastapi.background import BackgroundTasks as FastAPIBackgroundTasks
            from fastapi.telemetry._api import _REQUEST_TELEMETRY_KEY, _RequestTelemetry

            self.provider = dropping_tracer_provider()
            request = _RequestTelemetry(
                span=None, span_method="GET", tracer=self.provider.get_tracer("fastapi")
            )
            self._context = otel_context.set_value(_REQUEST_TELEMETRY_KEY, request)
            self.new = FastAPIBackgroundTasks
        else:
            msg = f"unknown variant {name!r}"
            raise ValueError(msg)

    def enter(self) -> object | None:
        """Attach the request-scoped context the variant needs (FastAPI native only); for
        ts-full-sdkspan, turn the deferred span off until ``exit``."""
        if self._sdk_span:
            from taskscope import _spans

            self._saved = _spans._sdk_tracer
            _spans._sdk_tracer = lambda tracer: None
        if self._context is None:
            return None
        return otel_context.attach(self._context)

    def exit(self, token: object | None) -> None:
        if self._sdk_span:
            from taskscope import _spans

            _spans._sdk_tracer = self._saved
        if token is not None:
            otel_context.detach(token)  # type: ignore[arg-type]

    def close(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


def _same(func: F) -> F:
    return func
