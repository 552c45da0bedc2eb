"""The one frozen settings object that every part of taskscope reads."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from taskscope._environ import parse_bool, parse_choice, parse_float, parse_int, read_variables
from taskscope._redact import redact_secrets

if TYPE_CHECKING:
    from collections.abc import Sequence

    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider
    from prometheus_client import CollectorRegistry

    from taskscope._sink import Sink

DEFAULT_MAX_TASKS_PER_RESPONSE = 1000

SpanMode = Literal["child", "link", "off"]
_SPAN_MODES: tuple[SpanMode, ...] = ("child", "link", "off")


@dataclass(frozen=True, kw_only=True, eq=False)
class Telemetry:
    """How taskscope observes background tasks.

    Every argument has a working default; ``None`` providers and registry are resolved
    late, at first use: the process Prometheus registry and the global OpenTelemetry
    providers. Nothing is read from the environment unless you call :meth:`from_env`.
    """

    registry: CollectorRegistry | None = None
    """Prometheus registry for taskscope's metrics (default: the process registry)."""
    prometheus: bool = True
    """Record Prometheus metrics."""
    tracer_provider: TracerProvider | None = None
    """OpenTelemetry tracer provider (default: the global one, looked up at use)."""
    meter_provider: MeterProvider | None = None
    """OpenTelemetry meter provider for the OTel copies of the metrics (default: global)."""
    otel_metrics: bool = True
    """Record the metrics through the OpenTelemetry metrics API as well (skipped when no
    meter provider is configured at the first task: the API's default does nothing)."""
    span_mode: SpanMode = "child"
    """``child``: the task span is a child of the request span; ``link``: a new trace
    linked to it (use when incoming trace context is not trusted); ``off``: no spans."""
    logger: Any = None
    """A structlog logger (default: ``structlog.get_logger("taskscope")``)."""
    continue_on_error: bool = False
    """Run the remaining tasks of a response after one fails (Starlette stops)."""
    max_task_names: int = 500
    """Distinct task names before new ones are recorded as ``__other__``."""
    max_error_types: int = 1000
    """Distinct (task, error_type) pairs, all tasks together, before new error types are
    recorded as ``__other__`` (bounds ``taskscope_task_failures_total``)."""
    max_error_types_per_task: int = 20
    """Distinct error types of one task before new ones are recorded as ``__other__``."""
    max_tasks_per_response: int = DEFAULT_MAX_TASKS_PER_RESPONSE
    """Past this many ``add_task`` calls on one object, warn once (and count)."""
    max_message_length: int = 256
    """Exception messages are truncated to this many characters."""
    redact: Callable[[str], str] = redact_secrets
    """Applied to every exception message before it is recorded anywhere."""
    loop_probe: bool = True
    """Measure event-loop lag and detect loop stalls, blamed on the background task running."""
    block_threshold: float = 0.1
    """The loop not back for this long (seconds) is a stall (a block); the loop's heartbeat
    runs every fifth of the smallest threshold on the loop (2 to 25 ms)."""
    lag_interval: float = 0.1
    """Seconds between two observations of the loop lag (the largest of the interval)."""
    hung_after: float | None = 60.0
    """A task still running after this many seconds is reported as hung (``task.hung``),
    with where it is waiting; then again at a bounded back-off while it runs. ``None``:
    off. Checked by the loop probe's watchdog thread (needs ``loop_probe``)."""
    clock: Callable[[], float] = time.perf_counter
    """Monotonic clock in seconds (inject a fake one in tests)."""
    sinks: Sequence[Sink] = ()
    """Your own receivers of every task record, loop block, hung task and lag measurement
    (see :class:`taskscope.Sink`), next to Prometheus, OpenTelemetry and the logs."""
    _runtime: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.span_mode not in _SPAN_MODES:
            # The value is not quoted: settings may come from the environment (see _environ).
            msg = f"span_mode must be one of {', '.join(_SPAN_MODES)}"
            raise ValueError(msg)
        for name in ("block_threshold", "lag_interval"):
            if not getattr(self, name) > 0:
                msg = f"{name} must be a positive number of seconds"
                raise ValueError(msg)
        if self.hung_after is not None and not self.hung_after > 0:
            msg = "hung_after must be a positive number of seconds, or None (off)"
            raise ValueError(msg)
        for name in (
            "max_task_names",
            "max_error_types",
            "max_error_types_per_task",
            "max_tasks_per_response",
            "max_message_length",
        ):
            if getattr(self, name) < 1:
                msg = f"{name} must be at least 1"
                raise ValueError(msg)

    def with_options(self, **changes: Any) -> Telemetry:
        """A copy with some settings changed (instruments are not shared)."""
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Telemetry:
        """Build settings from ``TASKSCOPE_*`` variables (read now, never at import).

        Recognised: ``TASKSCOPE_SPAN_MODE``, ``TASKSCOPE_CONTINUE_ON_ERROR``,
        ``TASKSCOPE_MAX_TASK_NAMES``, ``TASKSCOPE_MAX_ERROR_TYPES``,
        ``TASKSCOPE_MAX_ERROR_TYPES_PER_TASK``, ``TASKSCOPE_LOOP_PROBE``,
        ``TASKSCOPE_BLOCK_THRESHOLD``, ``TASKSCOPE_LAG_INTERVAL``, ``TASKSCOPE_PROMETHEUS``,
        ``TASKSCOPE_OTEL_METRICS``,
        ``TASKSCOPE_MAX_MESSAGE_LENGTH``, ``TASKSCOPE_HUNG_AFTER`` (seconds, or ``off``).
        Keyword arguments win over the environment.
        An error names the variable, never its value.
        """
        env = os.environ if environ is None else environ
        kwargs: dict[str, Any] = {}
        parsers: dict[str, tuple[str, Callable[[str], Any]]] = {
            "TASKSCOPE_SPAN_MODE": ("span_mode", parse_choice(*_SPAN_MODES)),
            "TASKSCOPE_CONTINUE_ON_ERROR": ("continue_on_error", parse_bool),
            "TASKSCOPE_MAX_TASK_NAMES": ("max_task_names", parse_int),
            "TASKSCOPE_MAX_ERROR_TYPES": ("max_error_types", parse_int),
            "TASKSCOPE_MAX_ERROR_TYPES_PER_TASK": ("max_error_types_per_task", parse_int),
            "TASKSCOPE_LOOP_PROBE": ("loop_probe", parse_bool),
            "TASKSCOPE_BLOCK_THRESHOLD": ("block_threshold", parse_float),
            "TASKSCOPE_LAG_INTERVAL": ("lag_interval", parse_float),
            "TASKSCOPE_PROMETHEUS": ("prometheus", parse_bool),
            "TASKSCOPE_OTEL_METRICS": ("otel_metrics", parse_bool),
            "TASKSCOPE_MAX_MESSAGE_LENGTH": ("max_message_length", parse_int),
            "TASKSCOPE_HUNG_AFTER": ("hung_after", _parse_seconds_or_off),
        }
        kwargs.update(read_variables(env, parsers))
        kwargs.update(overrides)
        return cls(**kwargs)


def _parse_seconds_or_off(raw: str) -> float | None:
    value = raw.strip().lower()
    if value in {"off", "none", "false", "0"}:
        return None
    return float(value)
