"""Fault matrix rows that need no real server: failing tasks, middleware stacks, registry
reuse, hostile headers and secrets, very many tasks, where metrics are (not) exposed."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from opentelemetry import baggage, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from taskscope import BackgroundTasks, Telemetry, instrument_app
from tests.conftest import Observed, make_observed
from tests.reliability.harness import report


class Boom(RuntimeError):
    """The failure of the task in the middle."""


def _app(endpoint: Callable[[Request], Awaitable[Response]], **kwargs: Any) -> Starlette:
    return Starlette(routes=[Route("/", endpoint)], **kwargs)


@pytest.mark.parametrize("continue_on_error", [False, True], ids=["stop", "continue"])
def test_failing_task_in_the_middle(continue_on_error: bool) -> None:
    """One failure among five tasks: counted once, logged once, the rest skipped or run."""
    obs = make_observed(continue_on_error=continue_on_error)
    ran: list[int] = []

    def step(i: int) -> None:
        ran.append(i)

    def fail() -> None:
        raise Boom("in the middle")

    async def endpoint(request: Request) -> Response:
        tasks = BackgroundTasks(telemetry=obs.telemetry)
        tasks.add_task(step, 1)
        tasks.add_task(step, 2)
        tasks.add_task(fail)
        tasks.add_task(step, 4)
        tasks.add_task(step, 5)
        return Response("ok", background=tasks)

    with TestClient(_app(endpoint), raise_server_exceptions=False) as client:
        assert client.get("/").status_code == 200
    outcomes = _by_outcome(obs)
    boom = "tests.test_reliability_inprocess.Boom"  # the same form as the span's error.type
    assert obs.value("taskscope_task_failures_total", task=_name(fail), error_type=boom) == 1
    assert len(obs.logs.named("task.failed")) == 1
    if continue_on_error:
        assert ran == [1, 2, 4, 5]
        assert outcomes == {"success": 4, "failure": 1}
        assert obs.logs.named("task.skipped") == []
    else:
        assert ran == [1, 2]
        assert outcomes == {"success": 2, "failure": 1, "skipped": 2}
        assert len(obs.logs.named("task.skipped")) == 2
    report(
        f"failing-task-in-middle/{'continue' if continue_on_error else 'stop'}", outcomes=outcomes
    )
    obs.tracer_provider.shutdown()


def _name(func: Callable[..., Any]) -> str:
    return f"{func.__module__}.{func.__qualname__}"


def _by_outcome(obs: Observed) -> dict[str, int]:
    totals: dict[str, int] = {}
    for (_task, outcome), value in obs.outcomes().items():
        totals[outcome] = totals.get(outcome, 0) + int(value)
    return totals


class _Passthrough(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        return await call_next(request)


def test_stacked_base_http_middleware_tasks_accounted(observed: Observed) -> None:
    """Three stacked ``BaseHTTPMiddleware`` layers (which run the response in a task group):
    every task of every request still ends with exactly one outcome."""

    async def quick() -> None:
        pass

    def quick_sync() -> None:
        pass

    def broken() -> None:
        raise Boom("x")

    async def endpoint(request: Request) -> Response:
        tasks = BackgroundTasks(telemetry=observed.telemetry)
        tasks.add_task(quick)
        if request.query_params.get("fail"):
            tasks.add_task(broken)
        tasks.add_task(quick_sync)
        return Response("ok", background=tasks)

    app = _app(endpoint, middleware=[Middleware(_Passthrough) for _ in range(3)])
    with TestClient(app, raise_server_exceptions=False) as client:
        for index in range(30):
            client.get("/?fail=1" if index % 3 == 0 else "/")
    outcomes = _by_outcome(observed)
    assert outcomes == {"success": 50, "failure": 10, "skipped": 10}  # 20x2 + 10x(1+fail+skip)
    report("base-http-middleware-x3", outcomes=outcomes)


def test_registry_reuse_no_duplicated_timeseries() -> None:
    """The same registry across apps, ``Telemetry`` objects and test clients: no
    "Duplicated timeseries" error, and the counts add up on the one registry."""
    registry = CollectorRegistry()

    async def task() -> None:
        pass

    def make() -> Starlette:
        async def endpoint(request: Request) -> Response:
            tasks = BackgroundTasks()
            tasks.add_task(task)
            return Response("ok", background=tasks)

        app = _app(endpoint)
        instrument_app(app, Telemetry(registry=registry, otel_metrics=False, span_mode="off"))
        return app

    for _ in range(4):
        app = make()
        for _ in range(2):
            with TestClient(app) as client:
                assert client.get("/").status_code == 200
    assert registry.get_sample_value(
        "taskscope_tasks_total", {"task": _name(task), "outcome": "success"}
    ) == pytest.approx(8)


# -- hostile or untrusted input ----------------------------------------------------------

_PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])


class _ExtractingMiddleware:
    """What OpenTelemetry's ASGI middleware does: extract headers, open a request span."""

    def __init__(self, app: Any, tracer_provider: Any) -> None:
        self.app = app
        self.tracer = tracer_provider.get_tracer("test.asgi")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        context = _PROPAGATOR.extract(carrier)
        with self.tracer.start_as_current_span("GET /", context=context):
            from opentelemetry import context as otel_context

            token = otel_context.attach(
                baggage.set_baggage("from_app", "ok", otel_context.get_current())
            )
            try:
                await self.app(scope, receive, send)
            finally:
                otel_context.detach(token)


def _traced_app(obs: Observed, task: Callable[..., Any], *args: Any) -> Any:
    async def endpoint(request: Request) -> Response:
        tasks = BackgroundTasks(telemetry=obs.telemetry)
        tasks.add_task(task, *args)
        return Response("ok", background=tasks)

    return _ExtractingMiddleware(_app(endpoint), obs.tracer_provider)


VALID_PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
HOSTILE_HEADERS: list[dict[str, str]] = [
    {"traceparent": "garbage"},
    {"traceparent": "00-" + "0" * 32 + "-" + "0" * 16 + "-01"},  # all-zero ids
    {"traceparent": "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra-" + "x" * 9000},
    {"traceparent": VALID_PARENT, "tracestate": "a=" + "b" * 10_000},
    {"traceparent": VALID_PARENT, "tracestate": ",".join(f"k{i}=v" for i in range(500))},
    {"traceparent": VALID_PARENT, "tracestate": "=,=,=;;;\x7f"},
    {"baggage": "k=" + "v" * 20_000},
    {"baggage": ",".join(f"k{i}=v{i}" for i in range(2000))},
    {"baggage": "%%%=%%%;;;=,,=="},
    {"baggage": "user=alice%40example.com;prop=1,session=s3cr3t"},
    {"traceparent": "\u00ff" * 60, "baggage": "\u00fe\u00ff=\u0080"},  # sent as latin-1
]


@pytest.mark.parametrize("headers", HOSTILE_HEADERS, ids=range(len(HOSTILE_HEADERS)))
def test_malformed_trace_headers_cause_no_error(headers: dict[str, str]) -> None:
    """Malformed or oversized traceparent/tracestate/baggage: the task runs and is recorded,
    taskscope's instrumentation reports no error."""
    obs = make_observed()

    async def task() -> None:
        pass

    with TestClient(_traced_app(obs, task)) as client:
        raw = [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]
        assert client.get("/", headers=raw).status_code == 200
    assert _by_outcome(obs) == {"success": 1}
    assert len(obs.task_spans()) == 1
    assert (
        sum(
            obs.value("taskscope_instrumentation_errors_total", signal=signal)
            for signal in ("prometheus", "otel_metrics", "tracing", "logging", "loop_probe")
        )
        == 0
    )
    obs.tracer_provider.shutdown()


def test_link_mode_ignores_incoming_parent_and_baggage_never_copied() -> None:
    """``span_mode="link"``: a new trace linked to the request; baggage never on spans."""
    obs = make_observed(span_mode="link")

    async def task() -> None:
        pass

    headers = {"traceparent": VALID_PARENT, "baggage": "tenant=canary-baggage-7781"}
    with TestClient(_traced_app(obs, task)) as client:
        assert client.get("/", headers=headers).status_code == 200
    (span,) = obs.task_spans()
    request_span = next(s for s in obs.spans() if s.name == "GET /")
    assert span.parent is None
    assert span.context is not None
    assert request_span.context is not None
    assert span.context.trace_id != int(VALID_PARENT.split("-")[1], 16)
    assert [link.context.span_id for link in span.links] == [request_span.context.span_id]
    for recorded in obs.spans():
        assert "canary-baggage-7781" not in _dump_span(recorded)
        assert "from_app" not in _dump_span(recorded)
    obs.tracer_provider.shutdown()


def _dump_span(span: Any) -> str:
    return str(span.to_json())


CANARIES = {
    "password": "hunter2-canary-pw",
    "bearer": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjYW5hcnkifQ.canary-sig_Xy",
    "opaque_token": "tok_canary_4f9a8b7c6d5e",
    "email": "canary.person@example.org",
    "db_password": "dbpass-canary-99",
    "slash_password": "sl/ash-canary-77",
    "at_password": "p@ss-canary-55",
    "api_key": "AKcanaryAPIKEY123456",
    "cut_password": "canary-cut-by-truncation",
}

CANARY_MESSAGES = [
    f"login failed: password={CANARIES['password']}",
    f"upstream said 401 for Authorization: Bearer {CANARIES['bearer']}",
    f"token: {CANARIES['opaque_token']} rejected",
    f"could not email {CANARIES['email']}",
    f"connect postgresql://app:{CANARIES['db_password']}@db.internal:5432/app failed",
    f"connect redis://:{CANARIES['slash_password']}@cache:6379/0 failed",
    f"connect mysql://root:{CANARIES['at_password']}@mysql/app failed",
    f"bad request {{'api_key': '{CANARIES['api_key']}', 'n': 1}}",
    # the URL straddles max_message_length (256): truncating first would cut off the "@"
    "x" * 225 + f" postgresql://app:{CANARIES['cut_password']}@db/app",
]


def test_secrets_never_exported(capsys: pytest.CaptureFixture[str]) -> None:
    """Secrets in task arguments and exception messages: zero occurrences in exported spans,
    taskscope's log events (recorded and rendered by structlog's default) and /metrics."""
    obs = make_observed()
    default_logs = Telemetry(
        registry=CollectorRegistry(),
        tracer_provider=obs.tracer_provider,
        meter_provider=obs.telemetry.meter_provider,
    )

    def leaky(message: str, password: str, email: str, **kwargs: Any) -> None:
        raise Boom(message)

    async def leaky_async(message: str, dsn: str) -> None:
        raise Boom(message)

    def endpoint_for(telemetry: Telemetry) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            tasks = BackgroundTasks(telemetry=telemetry)
            index = int(request.query_params["i"])
            message = CANARY_MESSAGES[index]
            if index % 2:
                tasks.add_task(
                    leaky,
                    message,
                    CANARIES["password"],
                    email=CANARIES["email"],
                    token=CANARIES["opaque_token"],
                )
            else:
                dsn = f"postgresql://app:{CANARIES['db_password']}@db/app"
                tasks.add_task(leaky_async, message, dsn)
            return Response("ok", background=tasks)

        return endpoint

    for telemetry in (obs.telemetry, default_logs):
        app = _ExtractingMiddleware(_app(endpoint_for(telemetry)), obs.tracer_provider)
        with TestClient(app, raise_server_exceptions=False) as client:
            for index in range(len(CANARY_MESSAGES)):
                assert client.get(f"/?i={index}").status_code == 200
    rendered_logs = capsys.readouterr()
    exported = {
        # taskscope's spans: the request span of an ASGI middleware records the re-raised
        # exception unredacted (Starlette re-raises a failed task) - not taskscope's to fix.
        "spans": "\n".join(_dump_span(span) for span in obs.task_spans()),
        "logs": repr(obs.logs.events),
        "default_logs": rendered_logs.out + rendered_logs.err,
        "metrics": generate_latest(obs.registry).decode()
        + generate_latest(default_logs.registry or CollectorRegistry()).decode(),
    }
    assert len(obs.logs.named("task.failed")) == len(CANARY_MESSAGES)
    assert "task.failed" in exported["default_logs"]
    # Every secret contains "canary" (and no task name does): a partial leak counts too.
    assert all("canary" in secret for secret in CANARIES.values())
    leaks = {
        (where, text[max(0, text.lower().find("canary") - 40) :][:80])
        for where, text in exported.items()
        if "canary" in text.lower()
    }
    assert sorted(leaks) == []
    report("hostile/canary-secrets", canaries=len(CANARIES), messages=len(CANARY_MESSAGES), leaks=0)
    obs.tracer_provider.shutdown()


def test_very_many_add_task_calls_bounded_and_warned() -> None:
    """20,000 ``add_task`` calls in one request: a bounded, small cost per task, and one
    ``task.too_many_tasks`` warning past ``max_tasks_per_response``."""
    obs = make_observed(max_tasks_per_response=1000, span_mode="off", otel_metrics=False)
    count = 20_000
    sizes: list[float] = []

    async def tiny(i: int) -> None:
        pass

    async def endpoint(request: Request) -> Response:
        tasks = BackgroundTasks(telemetry=obs.telemetry)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(count):
            tasks.add_task(tiny, i)
        sizes.append((tracemalloc.get_traced_memory()[0] - before) / count)
        tracemalloc.stop()
        return Response("ok", background=tasks)

    with TestClient(_app(endpoint)) as client:
        assert client.get("/").status_code == 200
    assert _by_outcome(obs) == {"success": count}
    warnings = obs.logs.named("task.too_many_tasks")
    assert len(warnings) == 1
    assert warnings[0]["count"] == 1001
    assert obs.value("taskscope_task_warnings_total", task=_name(tiny), kind="too_many_tasks") == 1
    assert sizes[0] < 1024  # bytes retained per queued task (task object + capture)
    report("hostile/20k-add_task-one-request", bytes_per_task=round(sizes[0]), warnings=1)


def test_metrics_not_exposed_unless_mounted(observed: Observed) -> None:
    """``instrument_app`` adds no route: ``/metrics`` is the app's own business."""

    async def endpoint(request: Request) -> Response:
        return Response("ok")

    app = _app(endpoint)
    instrument_app(app, observed.telemetry)
    with TestClient(app) as client:
        assert client.get("/metrics").status_code == 404


def test_standalone_metrics_server_binds_loopback_by_default() -> None:
    """``start_metrics_server()`` listens on 127.0.0.1 unless told otherwise."""
    from taskscope.exposition import start_metrics_server

    with start_metrics_server(port=0, registry=CollectorRegistry()) as server:
        assert server.addr == "127.0.0.1"
        import httpx

        assert httpx.get(server.url, timeout=5).status_code == 200


@pytest.fixture(autouse=True)
def _no_global_provider_change() -> Iterator[None]:
    """These tests pass providers explicitly; the global ones must stay untouched."""
    tracer_provider = trace.get_tracer_provider()
    textmap = propagate.get_global_textmap()
    yield
    assert trace.get_tracer_provider() is tracer_provider
    assert propagate.get_global_textmap() is textmap


def test_tasks_of_a_response_never_sent_end_in_an_outcome(observed: Observed) -> None:
    """FastAPI endpoint adds a task, then raises HTTPException: the task never runs; the
    promise says it still ends in exactly one recorded outcome."""
    from fastapi import FastAPI, HTTPException

    app = FastAPI()

    async def job() -> None:
        pass

    @app.get("/")
    async def endpoint(tasks: BackgroundTasks) -> str:
        tasks.add_task(job)
        raise HTTPException(400)

    instrument_app(app, observed.telemetry)
    with TestClient(app) as client:
        assert client.get("/").status_code == 400
    gc.collect()
    assert sum(_by_outcome(observed).values()) == 1
    (skipped,) = [e for e in observed.logs.events if e["event"] == "task.skipped"]
    assert skipped["reason"] == "the response carrying it was never sent"


class _RaisingLogger:
    """A logger whose every call fails (a broken handler, a full disk)."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        def fail(*args: Any, **kwargs: Any) -> None:
            raise OSError("log sink broken")

        return fail


class _RaisingProcessor:
    """A span processor that fails at every hook."""

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        raise RuntimeError("processor broken")

    def on_end(self, span: Any) -> None:
        raise RuntimeError("processor broken")

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def test_broken_instrumentation_never_breaks_tasks() -> None:
    """A logger that raises, a span processor that raises and a registry where taskscope's
    names are taken: every task still runs with Starlette's semantics, nothing reaches the
    app, the failures are counted where a sink still works."""
    from opentelemetry.sdk.trace import TracerProvider
    from prometheus_client import Counter

    counted = CollectorRegistry()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(_RaisingProcessor())  # type: ignore[arg-type]
    broken_logs = Telemetry(
        registry=counted, logger=_RaisingLogger(), tracer_provider=tracer_provider
    )
    taken = CollectorRegistry()
    Counter("taskscope_tasks", "someone else's", ["x"], registry=taken)
    taken_names = Telemetry(registry=taken, tracer_provider=tracer_provider)
    ran: list[str] = []

    async def fine() -> None:
        ran.append("fine")

    def fails() -> None:
        ran.append("fails")
        raise Boom("task failure")

    for telemetry in (broken_logs, taken_names):

        async def endpoint(request: Request, telemetry: Telemetry = telemetry) -> Response:
            tasks = BackgroundTasks(telemetry=telemetry)
            tasks.add_task(fine)
            tasks.add_task(fails)
            tasks.add_task(fine)
            return Response("ok", background=tasks)

        with TestClient(_app(endpoint)) as client, pytest.raises(Boom):
            client.get("/")  # Starlette re-raises the task's own exception, nothing else
    assert ran == ["fine", "fails"] * 2
    outcomes = {
        outcome: counted.get_sample_value(
            "taskscope_tasks_total", {"task": _name(task), "outcome": outcome}
        )
        for task, outcome in ((fine, "success"), (fails, "failure"), (fine, "skipped"))
    }
    assert outcomes == {"success": 1.0, "failure": 1.0, "skipped": 1.0}
    errors = {
        signal: counted.get_sample_value(
            "taskscope_instrumentation_errors_total", {"signal": signal}
        )
        for signal in ("logging", "tracing")
    }
    assert (errors["logging"] or 0) >= 2  # task.failed and task.skipped could not be logged
    report("broken-instrumentation", outcomes=outcomes, instrumentation_errors=errors)
    tracer_provider.shutdown()
