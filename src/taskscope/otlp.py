"""OTLP export of taskscope's spans and metrics through the OpenTelemetry SDK.

The SDK and the OTLP/HTTP exporter are the ``otlp`` extra (``pip install taskscope[otlp]``);
they are imported when :func:`setup_otlp` is called. Libraries should depend on the OTel
API only; this module is for the *application* that owns its providers::

    from taskscope import instrument_app
    from taskscope.otlp import setup_otlp_from_env

    otlp = setup_otlp_from_env()              # reads OTEL_* now
    instrument_app(app, otlp.telemetry())     # taskscope's spans/metrics go to OTLP
    ...
    otlp.shutdown()                           # bounded: never longer than shutdown_timeout

What it sets up, and why:

* a ``TracerProvider`` with a ``BatchSpanProcessor`` (the simple processor blocks
  ``span.end()`` - on the event loop - for as long as the collector takes);
* a ``MeterProvider`` with a ``PeriodicExportingMetricReader`` and explicit seconds
  buckets for taskscope's histograms (the SDK's defaults suit milliseconds);
* short exporter timeouts (``export_timeout``, 2 s), and a :meth:`OtlpHandle.shutdown`
  that flushes and shuts down in daemon threads joined with ``shutdown_timeout``: with
  the collector down or hung, SDK shutdown takes 7-30 s with its defaults;
* loss made visible in Prometheus: ``taskscope_otlp_export_failures_total{signal}``
  (failed or timed-out export calls, ``signal`` = ``traces`` | ``metrics``) and
  ``taskscope_otlp_spans_dropped_total`` (spans the batch processor dropped because its
  queue was full, or that ended after shutdown).

Call it in each worker process (e.g. in the app's lifespan), not in a pre-fork master:
export threads do not survive ``fork``. Global providers are left alone unless
``set_global=True``. :func:`setup_otlp` reads no
environment variable for what it is given; :func:`setup_otlp_from_env` reads
``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT``,
``OTEL_EXPORTER_OTLP_PROTOCOL``, ``OTEL_EXPORTER_OTLP_HEADERS``,
``OTEL_EXPORTER_OTLP_TIMEOUT``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES`` and
``OTEL_METRIC_EXPORT_INTERVAL`` when called. (TLS certificate and compression variables
are read by the OTLP exporter itself.)
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from taskscope._config import Telemetry

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    from prometheus_client import CollectorRegistry

__all__ = ("OtlpHandle", "setup_otlp", "setup_otlp_from_env")

SDK_MISSING = (
    "taskscope.otlp needs the OpenTelemetry SDK and OTLP exporter: pip install taskscope[otlp]"
)
_DEFAULT_ENDPOINTS = {"http/protobuf": "http://localhost:4318", "grpc": "http://localhost:4317"}


class OtlpHandle:
    """The providers :func:`setup_otlp` built, and their bounded flush and shutdown."""

    def __init__(
        self,
        tracer_provider: TracerProvider,
        meter_provider: MeterProvider,
        *,
        registry: CollectorRegistry | None,
        shutdown_timeout: float,
        counts_dropped_spans: bool,
    ) -> None:
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.registry = registry
        """The Prometheus registry of the loss counters (``None``: the process registry)."""
        self.shutdown_timeout = shutdown_timeout
        self.counts_dropped_spans = counts_dropped_spans
        """False on an SDK whose batch processor taskscope cannot hook (drops only logged)."""
        self._lock = threading.Lock()
        self._shutdown_result: bool | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> OtlpHandle:
        """:func:`setup_otlp` from the standard ``OTEL_*`` variables, read now.

        ``environ`` defaults to ``os.environ``; keyword arguments win over variables.
        """
        from taskscope._otlp.env import options_from_env

        options = options_from_env(os.environ if environ is None else environ)
        options.update(overrides)
        return setup_otlp(**options)

    def telemetry(self, **overrides: Any) -> Telemetry:
        """A :class:`taskscope.Telemetry` that uses these providers (and this registry)."""
        options: dict[str, Any] = {
            "tracer_provider": self.tracer_provider,
            "meter_provider": self.meter_provider,
            "registry": self.registry,
        }
        options.update(overrides)
        return Telemetry(**options)

    def force_flush(self, timeout: float | None = None) -> bool:
        """Export what is buffered; returns within ``timeout`` (default: shutdown_timeout)."""
        from taskscope._otlp.bounded import run_bounded

        limit = self.shutdown_timeout if timeout is None else timeout
        return run_bounded(
            {
                "traces flush": self.tracer_provider.force_flush,
                "metrics flush": lambda: self.meter_provider.force_flush(int(limit * 1000)),
            },
            limit,
        )

    def shutdown(self, timeout: float | None = None) -> bool:
        """Flush and shut both providers down, in at most ``timeout`` seconds.

        Returns whether everything finished in time. Idempotent; also registered to run
        at interpreter exit.
        """
        with self._lock:
            if self._shutdown_result is not None:
                return self._shutdown_result
            from taskscope._otlp.bounded import run_bounded

            limit = self.shutdown_timeout if timeout is None else timeout
            self._shutdown_result = run_bounded(
                {
                    "traces shutdown": self.tracer_provider.shutdown,
                    "metrics shutdown": lambda: self.meter_provider.shutdown(
                        timeout_millis=limit * 1000
                    ),
                },
                limit,
            )
            atexit.unregister(self._at_exit)
            return self._shutdown_result

    def _at_exit(self) -> None:
        self.shutdown()

    def __enter__(self) -> OtlpHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def setup_otlp(
    *,
    endpoint: str | None = None,
    traces_endpoint: str | None = None,
    metrics_endpoint: str | None = None,
    headers: Mapping[str, str] | None = None,
    service_name: str | None = None,
    resource_attributes: Mapping[str, str] | None = None,
    protocol: str = "http/protobuf",
    export_timeout: float = 2.0,
    shutdown_timeout: float = 3.0,
    export_interval: float = 10.0,
    schedule_delay: float = 1.0,
    max_queue_size: int = 2048,
    registry: CollectorRegistry | None = None,
    set_global: bool = False,
) -> OtlpHandle:
    """Build SDK tracer and meter providers that export taskscope's telemetry over OTLP.

    ``endpoint`` is the collector's base URL (default ``http://localhost:4318``, or
    ``:4317`` for ``grpc``); for HTTP the signal paths ``/v1/traces`` and ``/v1/metrics``
    are appended. ``traces_endpoint`` / ``metrics_endpoint`` are full URLs used as given.
    ``export_timeout`` bounds each export call, ``shutdown_timeout`` the whole of
    :meth:`OtlpHandle.shutdown`. ``export_interval`` is the metric export period,
    ``schedule_delay`` the span batch delay, ``max_queue_size`` the span queue length
    (beyond it spans are dropped, and counted). Loss counters go to ``registry``
    (default: the process registry, looked up now). Nothing global is set unless
    ``set_global`` is true. Raises ``ImportError`` without the ``otlp`` extra.
    """
    for name, value in (
        ("export_timeout", export_timeout),
        ("shutdown_timeout", shutdown_timeout),
        ("export_interval", export_interval),
        ("schedule_delay", schedule_delay),
    ):
        if not value > 0:
            msg = f"{name} must be a positive number of seconds"
            raise ValueError(msg)
    if max_queue_size < 1:
        msg = "max_queue_size must be at least 1"
        raise ValueError(msg)
    protocol = protocol.strip().lower()
    if protocol not in _DEFAULT_ENDPOINTS:
        msg = "unsupported OTLP protocol: use 'http/protobuf' or 'grpc'"  # value not quoted
        raise ValueError(msg)
    _require_sdk(protocol)
    from prometheus_client import REGISTRY

    from taskscope._otlp import build
    from taskscope._otlp.counting import counters_for

    counters = counters_for(registry if registry is not None else REGISTRY)
    base = (endpoint or _DEFAULT_ENDPOINTS[protocol]).strip()
    span_exporter, metric_exporter = build.make_exporters(
        protocol,
        traces_endpoint or _signal_url(protocol, base, "v1/traces"),
        metrics_endpoint or _signal_url(protocol, base, "v1/metrics"),
        headers or {},
        export_timeout,
    )
    resource = build.make_resource(service_name, resource_attributes or {})
    tracer_provider, processor = build.make_tracer_provider(
        resource,
        span_exporter,
        counters,
        export_timeout=export_timeout,
        schedule_delay=schedule_delay,
        max_queue_size=max_queue_size,
    )
    meter_provider = build.make_meter_provider(
        resource,
        metric_exporter,
        counters,
        export_timeout=export_timeout,
        export_interval=export_interval,
    )
    if set_global:
        from opentelemetry import metrics, trace

        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
    handle = OtlpHandle(
        tracer_provider,
        meter_provider,
        registry=registry,
        shutdown_timeout=shutdown_timeout,
        counts_dropped_spans=processor.counts_drops,
    )
    atexit.register(handle._at_exit)
    return handle


def setup_otlp_from_env(environ: Mapping[str, str] | None = None, **overrides: Any) -> OtlpHandle:
    """:func:`setup_otlp` configured by the standard ``OTEL_*`` variables (read now)."""
    return OtlpHandle.from_env(environ, **overrides)


def _signal_url(protocol: str, base: str, path: str) -> str:
    if protocol == "grpc":
        return base
    return f"{base.rstrip('/')}/{path}"


def _require_sdk(protocol: str) -> None:
    try:
        import opentelemetry.sdk.metrics
        import opentelemetry.sdk.trace

        if protocol == "http/protobuf":
            import opentelemetry.exporter.otlp.proto.http  # noqa: F401
    except ImportError as exc:
        raise ImportError(SDK_MISSING) from exc
