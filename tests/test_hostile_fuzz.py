"""Fuzz: generated hostile callables, names, exceptions and messages through real apps.

Each example runs the same tasks twice, through a Starlette app with Starlette's own
``BackgroundTasks`` and through an app (Starlette or FastAPI) with taskscope's, and asserts:
the same tasks run and the same exception object propagates; every task ends in exactly one
outcome (and every task that ran in one span); ``/metrics`` answers in both formats and
parses (prometheus_client's parsers and ``promtool check metrics``); spans and metrics
encode to OTLP without losing an attribute; a canary secret appears in no output.
"""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text
from starlette.applications import Starlette
from starlette.background import BackgroundTasks as StarletteBackgroundTasks
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

import taskscope
from taskscope import instrument_app, task_name
from taskscope.exposition import MetricsApp
from tests.conftest import Observed, make_observed
from tests.system_tools import system_tool

Backend = Literal["asyncio", "trio"]
CANARY = "zq81CANARYx7"
CANARY_NUMBER = 739_118_273_645_501
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- generated input ---------------------------------------------------------------------
SPECIALS = ["\udcff", "\ud800", "\x00", "\n", "\r", "\t", "\x1b", "\x7f", "\x85", "\u2028"]
SPECIALS += ["\\", '"', "'", "{", "}", "=", ":", "@", "😀", "é", "__other__", " "]
hostile_text = st.lists(
    st.one_of(st.characters(exclude_categories=()), st.sampled_from(SPECIALS)), max_size=30
).map("".join)
SECRET_SHAPES = [
    f"password={CANARY}",
    f"{{'api_key': b'{CANARY}'}}",
    f"{{'api_key': {CANARY_NUMBER}}}",
    f'{{"token": "{CANARY}", "n": 1}}',
    f"{{'credentials': {{'user': 'bob', 'pw': '{CANARY}'}}}}",
    f"Config(secret_key='{CANARY}')",
    f"postgres://app:{CANARY}@db:5432/app",
    f"https://api.example.com/v1?api_key={CANARY}&page=2",
    f"Authorization: Bearer {CANARY}",
    f'{{"outer": "{{\\"password\\": \\"{CANARY}\\"}}"}}',
]
secret_text = st.builds(
    lambda before, shape, after: f"{before} {shape} {after}",
    hostile_text,
    st.sampled_from(SECRET_SHAPES),
    hostile_text,
)
messages = st.one_of(hostile_text, secret_text)
# type() refuses NUL and lone surrogates in a class name; anything else goes.
class_names = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1, max_size=20
)


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("cannot print")


class PayloadError(Exception):
    """Carries a non-string payload (str() shows its repr)."""


def _custom_error(name: str, message: str) -> Exception:
    cls: type[Exception] = type(name, (Exception,), {})
    return cls(message)


def _with_note(message: str, note: str) -> Exception:
    error = ValueError(message)
    error.add_note(note)
    return error


def _with_cause(message: str, cause: str) -> Exception:
    error = RuntimeError(message)
    error.__cause__ = KeyError(cause)
    error.__context__ = ValueError(cause)
    return error


errors = st.one_of(
    st.none(),
    st.builds(ValueError, messages),
    st.builds(_custom_error, class_names, messages),
    st.builds(UnprintableError),
    st.builds(
        PayloadError,
        st.dictionaries(
            st.sampled_from(["password", "api_key", "user"]),
            st.sampled_from([CANARY.encode(), CANARY_NUMBER, {"secret": CANARY}]),
            min_size=1,
        ).filter(lambda d: "user" not in d),
    ),
    st.builds(_with_note, messages, secret_text),
    st.builds(_with_cause, messages, secret_text),
)


class EvilStr(str):
    def __hash__(self) -> int:
        raise RuntimeError("hash")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq")


class RaisingMeta(type):
    def __getattribute__(cls, name: str) -> Any:
        if name in ("__module__", "__qualname__", "__name__"):
            raise RuntimeError(f"no {name}")
        return super().__getattribute__(name)


@dataclass
class Spec:
    """One task: how its callable is built and named, and what it raises."""

    kind: str
    sync: bool
    name: str
    module: object
    error: BaseException | None
    ran: list[int] = field(default_factory=list, repr=False)

    def build(self, index: int, ran: list[int]) -> Any:
        error = self.error

        def body() -> None:
            ran.append(index)
            if error is not None:
                raise error

        async def async_body() -> None:
            body()

        func: Any = body if self.sync else async_body
        func.__qualname__ = self.name  # any str is accepted
        func.__module__ = self.module
        if self.kind == "named":
            return task_name(self.name or "x")(func)
        if self.kind == "partial":
            return functools.partial(func)
        if self.kind == "lambda":  # sync only: an async lambda is a misuse taskscope flags
            return lambda: body()
        if self.kind == "meta_object":  # a callable object of a class that cannot be named

            def call(_self: object) -> None:
                body()

            async def acall(_self: object) -> None:
                body()

            namespace = {"__call__": call if self.sync else acall}
            return RaisingMeta("Hostile", (), namespace)()
        return func


specs = st.lists(
    st.builds(
        Spec,
        kind=st.sampled_from(["function", "named", "partial", "lambda", "meta_object"]),
        sync=st.booleans(),
        name=st.one_of(hostile_text, secret_text),
        module=st.one_of(hostile_text, st.none(), st.integers(), st.builds(EvilStr, hostile_text)),
        error=errors,
    ),
    min_size=1,
    max_size=5,
)


# -- running the same tasks through both implementations ----------------------------------
def _run_app(app: Any, backend: Backend) -> BaseException | None:
    with TestClient(app, backend=backend) as client:
        try:
            client.get("/work")
        except Exception as exc:
            return exc
    return None


def run_starlette(tasks: list[Spec], backend: Backend) -> tuple[list[int], BaseException | None]:
    ran: list[int] = []

    async def work(request: Request) -> Response:
        background = StarletteBackgroundTasks()
        for index, spec in enumerate(tasks):
            background.add_task(spec.build(index, ran))
        return Response("ok", background=background)

    raised = _run_app(Starlette(routes=[Route("/work", work)]), backend)
    return ran, raised


def run_taskscope(
    tasks: list[Spec], backend: Backend, framework: str, observed: Observed
) -> tuple[list[int], BaseException | None, list[str]]:
    ran: list[int] = []

    def add_all(background: Any) -> None:
        for index, spec in enumerate(tasks):
            background.add_task(spec.build(index, ran))

    metrics = MetricsApp(observed.registry, gzip=False)
    app: Any
    if framework == "fastapi":
        app = FastAPI()

        @app.get("/work")  # type: ignore[untyped-decorator,unused-ignore]
        def fastapi_work(background_tasks: taskscope.BackgroundTasks) -> str:
            add_all(background_tasks)
            return "ok"

        app.add_route("/metrics", metrics)
    else:

        async def work(request: Request) -> Response:
            background = taskscope.BackgroundTasks()
            add_all(background)
            return Response("ok", background=background)

        app = Starlette(routes=[Route("/work", work), Route("/metrics", metrics)])
    instrument_app(app, observed.telemetry)
    raised = _run_app(app, backend)
    bodies = []
    with TestClient(app, backend=backend) as client:
        for accept in ("text/plain", OPENMETRICS):
            response = client.get("/metrics", headers={"Accept": accept})
            assert response.status_code == 200, response.text
            bodies.append(response.text)
    return ran, raised, bodies


# -- the properties ------------------------------------------------------------------------
def check_exposition(text: str, openmetrics: str) -> None:
    list(parse_text(text))
    list(parse_openmetrics(openmetrics))  # type: ignore[no-untyped-call]
    result = subprocess.run(
        [system_tool("promtool", "prometheus"), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode in (0, 3), result.stderr + result.stdout  # 3: lint only
    assert "error" not in (result.stderr + result.stdout).lower()


def check_otlp(observed: Observed) -> bytes:
    """Spans and metrics encode, and no attribute is dropped on the way."""
    spans = observed.spans()
    request = encode_spans(spans)
    encoded = {
        span.span_id: span
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    }
    for span in spans:
        context = span.get_span_context()
        assert context is not None
        proto = encoded[context.span_id.to_bytes(8, "big")]
        assert len(proto.attributes) == len(dict(span.attributes or {})), span.name
        for proto_event, event in zip(proto.events, span.events, strict=True):
            assert len(proto_event.attributes) == len(dict(event.attributes or {})), event.name
    data = observed.metric_reader.get_metrics_data()
    assert data is not None
    metrics = encode_metrics(data)
    sdk_points = [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        for point in metric.data.data_points
    ]
    proto_points = [
        point
        for resource in metrics.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        for point in getattr(metric, metric.WhichOneof("data")).data_points
    ]
    sdk_counts = [len(dict(p.attributes or {})) for p in sdk_points]
    assert [len(p.attributes) for p in proto_points] == sdk_counts
    serialized: bytes = request.SerializeToString() + metrics.SerializeToString()
    return serialized


def check_everything(tasks: list[Spec], backend: Backend, framework: str) -> None:
    expected_ran, expected_error = run_starlette(tasks, backend)
    observed = make_observed(loop_probe=False)
    try:
        ran, raised, (text, openmetrics) = run_taskscope(tasks, backend, framework, observed)
        assert ran == expected_ran  # the same tasks ran, in the same order
        assert raised is expected_error  # the same exception object propagated
        assert sum(observed.outcomes().values()) == len(tasks)  # one outcome per task
        assert len(observed.task_spans()) == len(ran)  # one span per task that ran
        assert observed.value("taskscope_instrumentation_errors_total", signal="tracing") == 0
        check_exposition(text, openmetrics)
        serialized = check_otlp(observed)
        outputs = [text, openmetrics, repr(observed.logs.events)]
        outputs += [span.to_json() for span in observed.spans()]
        for output in outputs:
            assert CANARY not in output
            assert str(CANARY_NUMBER) not in output
        assert CANARY.encode() not in serialized
        assert str(CANARY_NUMBER).encode() not in serialized
    finally:
        observed.tracer_provider.shutdown()


@FUZZ
@given(
    tasks=specs,
    backend=st.sampled_from(["asyncio", "trio"]),
    framework=st.sampled_from(["starlette", "fastapi"]),
)
def test_hostile_tasks_behave_as_with_starlette_and_leave_clean_signals(
    tasks: list[Spec], backend: Backend, framework: str
) -> None:
    """Hostile callables, names, messages, notes and causes: parity, accounting, clean output."""
    check_everything(tasks, backend, framework)


# Exception *classes* that misbehave: a metaclass whose __name__/__module__ raise, a
# __module__ whose comparisons raise, a lone surrogate in the qualified name. taskscope's
# span code in _run.py names the class itself; it needs taskscope._safe's helpers.
class MetaError(Exception, metaclass=RaisingMeta):
    pass


def _evil_module_error(message: str) -> Exception:
    cls: type[Exception] = type("EvilModuleError", (Exception,), {"__module__": EvilStr("evil")})
    return cls(message)


def _surrogate_qualname_error(message: str) -> Exception:
    cls: type[Exception] = type("SurrogateError", (Exception,), {})
    cls.__qualname__ = "Surrogate\udcffError"
    return cls(message)


class Hostile:
    """Holds an exception whose class cannot be named (Hypothesis' reports would try)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __repr__(self) -> str:
        return "Hostile(<an exception of a hostile class>)"


hostile_classes = st.one_of(
    messages.map(lambda m: Hostile(MetaError(m))),
    messages.map(lambda m: Hostile(_evil_module_error(m))),
    messages.map(lambda m: Hostile(_surrogate_qualname_error(m))),
)


@FUZZ
@given(tasks=specs, error=hostile_classes, backend=st.sampled_from(["asyncio", "trio"]))
@example(
    tasks=[Spec("function", True, "t", "m", None)],
    error=Hostile(MetaError("boom")),
    backend="asyncio",
)
def test_hostile_exception_classes_cost_nothing(
    tasks: list[Spec], error: Hostile, backend: Backend
) -> None:
    """Exception classes with hostile names: the same properties hold."""
    tasks = [*tasks, Spec("function", False, "failing", "m", error.error)]
    check_everything(tasks, backend, "starlette")
