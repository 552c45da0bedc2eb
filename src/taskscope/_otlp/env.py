"""The standard ``OTEL_*`` variables, read when asked (never at import)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from taskscope._environ import InvalidValueError, parse_choice, read_variables


def parse_pairs(raw: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` with percent-encoded values (W3C baggage style), as OTel specifies."""
    pairs: dict[str, str] = {}
    for number, item in enumerate(raw.split(","), start=1):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            # Never quote the entry: it is often a credential ("Authorization: Bearer ...").
            msg = f"expected comma-separated key=value pairs; entry {number} has no key=value"
            raise InvalidValueError(msg)
        pairs[unquote(key.strip())] = unquote(value.strip())
    return pairs


def _millis(raw: str) -> float:
    try:
        value = float(raw.strip()) / 1000.0
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        msg = "expected a positive number of milliseconds"
        raise InvalidValueError(msg)
    return value


_VARIABLES: dict[str, tuple[str, Any]] = {
    "OTEL_EXPORTER_OTLP_ENDPOINT": ("endpoint", str.strip),
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ("traces_endpoint", str.strip),
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": ("metrics_endpoint", str.strip),
    "OTEL_EXPORTER_OTLP_PROTOCOL": ("protocol", parse_choice("http/protobuf", "grpc")),
    "OTEL_EXPORTER_OTLP_HEADERS": ("headers", parse_pairs),
    "OTEL_EXPORTER_OTLP_TIMEOUT": ("export_timeout", _millis),
    "OTEL_SERVICE_NAME": ("service_name", str.strip),
    "OTEL_RESOURCE_ATTRIBUTES": ("resource_attributes", parse_pairs),
    "OTEL_METRIC_EXPORT_INTERVAL": ("export_interval", _millis),
}


def options_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments for ``setup_otlp`` from the variables that are set and non-empty."""
    return read_variables(environ, _VARIABLES)
