"""Telemetry settings: validation and from_env()."""

from __future__ import annotations

import pytest

from taskscope import Telemetry


def test_defaults_are_lazy() -> None:
    """Constructing settings resolves nothing (no registry, no providers)."""
    telemetry = Telemetry()
    assert telemetry.registry is None
    assert telemetry.tracer_provider is None
    assert telemetry._runtime is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"span_mode": "sideways"}, "span_mode"),
        ({"block_threshold": 0}, "block_threshold"),
        ({"lag_interval": -1}, "lag_interval"),
        ({"max_task_names": 0}, "max_task_names"),
    ],
)
def test_bad_settings_fail_clearly(options: dict[str, object], message: str) -> None:
    """Invalid settings raise ValueError naming the setting."""
    with pytest.raises(ValueError, match=message):
        Telemetry(**options)  # type: ignore[arg-type]


def test_from_env_reads_variables_when_called() -> None:
    """from_env() parses TASKSCOPE_* variables; keyword overrides win."""
    environ = {
        "TASKSCOPE_SPAN_MODE": "link",
        "TASKSCOPE_CONTINUE_ON_ERROR": "true",
        "TASKSCOPE_BLOCK_THRESHOLD": "0.25",
        "TASKSCOPE_MAX_TASK_NAMES": "50",
        "TASKSCOPE_LOOP_PROBE": "off",
    }
    telemetry = Telemetry.from_env(environ, max_task_names=7)
    assert telemetry.span_mode == "link"
    assert telemetry.continue_on_error is True
    assert telemetry.block_threshold == 0.25
    assert telemetry.loop_probe is False
    assert telemetry.max_task_names == 7


def test_from_env_rejects_garbage() -> None:
    """A malformed variable names itself in the error."""
    with pytest.raises(ValueError, match="TASKSCOPE_CONTINUE_ON_ERROR"):
        Telemetry.from_env({"TASKSCOPE_CONTINUE_ON_ERROR": "maybe"})


CANARY = "zq81CANARYx7"
# Every variable with a parser, and a malformed value that carries the canary.
MALFORMED_TASKSCOPE = {
    "TASKSCOPE_SPAN_MODE": f"child-{CANARY}",
    "TASKSCOPE_CONTINUE_ON_ERROR": CANARY,
    "TASKSCOPE_MAX_TASK_NAMES": CANARY,
    "TASKSCOPE_MAX_ERROR_TYPES": f"1e{CANARY}",
    "TASKSCOPE_MAX_ERROR_TYPES_PER_TASK": f"{CANARY}0",
    "TASKSCOPE_LOOP_PROBE": f"yes {CANARY}",
    "TASKSCOPE_BLOCK_THRESHOLD": f"0.1{CANARY}",
    "TASKSCOPE_LAG_INTERVAL": CANARY,
    "TASKSCOPE_PROMETHEUS": CANARY,
    "TASKSCOPE_OTEL_METRICS": CANARY,
    "TASKSCOPE_MAX_MESSAGE_LENGTH": f"256 {CANARY}",
}
MALFORMED_OTEL = {
    "OTEL_EXPORTER_OTLP_HEADERS": f"Authorization: Bearer {CANARY}",
    "OTEL_RESOURCE_ATTRIBUTES": f"deployment={CANARY},{CANARY}",
    "OTEL_EXPORTER_OTLP_TIMEOUT": f"{CANARY}ms",
    "OTEL_METRIC_EXPORT_INTERVAL": f"-{CANARY}",
    "OTEL_EXPORTER_OTLP_PROTOCOL": f"http/{CANARY}",
}


def _assert_names_variable_not_value(error: BaseException, variable: str) -> None:
    text = str(error)
    assert variable in text
    assert CANARY not in text
    # Nothing attached that a crash reporter could print either.
    assert error.__cause__ is None
    assert error.__context__ is None


def test_every_taskscope_variable_is_read() -> None:
    """Each TASKSCOPE_* variable of the table is recognised (the malformed list is complete)."""
    good = {
        "TASKSCOPE_SPAN_MODE": "off",
        "TASKSCOPE_CONTINUE_ON_ERROR": "1",
        "TASKSCOPE_MAX_TASK_NAMES": "7",
        "TASKSCOPE_MAX_ERROR_TYPES": "70",
        "TASKSCOPE_MAX_ERROR_TYPES_PER_TASK": "3",
        "TASKSCOPE_LOOP_PROBE": "no",
        "TASKSCOPE_BLOCK_THRESHOLD": "0.5",
        "TASKSCOPE_LAG_INTERVAL": "0.2",
        "TASKSCOPE_PROMETHEUS": "off",
        "TASKSCOPE_OTEL_METRICS": "false",
        "TASKSCOPE_MAX_MESSAGE_LENGTH": "99",
    }
    assert set(good) == set(MALFORMED_TASKSCOPE)
    t = Telemetry.from_env(good)
    assert (t.span_mode, t.continue_on_error, t.max_task_names) == ("off", True, 7)
    assert (t.max_error_types, t.max_error_types_per_task) == (70, 3)
    assert (t.loop_probe, t.prometheus, t.otel_metrics) == (False, False, False)
    assert (t.block_threshold, t.lag_interval, t.max_message_length) == (0.5, 0.2, 99)


@pytest.mark.parametrize("variable", sorted(MALFORMED_TASKSCOPE))
def test_taskscope_variable_errors_never_quote_the_value(variable: str) -> None:
    """A malformed TASKSCOPE_* variable: the error names it, never its value."""
    with pytest.raises(ValueError, match=variable) as info:
        Telemetry.from_env({variable: MALFORMED_TASKSCOPE[variable]})
    _assert_names_variable_not_value(info.value, variable)


@pytest.mark.parametrize("variable", sorted(MALFORMED_OTEL))
def test_otel_variable_errors_never_quote_the_value(variable: str) -> None:
    """A malformed OTEL_* variable (headers hold credentials): named, never quoted."""
    from taskscope._otlp.env import options_from_env

    with pytest.raises(ValueError, match=variable) as info:
        options_from_env({variable: MALFORMED_OTEL[variable]})
    _assert_names_variable_not_value(info.value, variable)


@pytest.mark.parametrize(
    "variable",
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "OTEL_SERVICE_NAME",
    ],
)
def test_free_text_otel_variables_are_taken_as_given(variable: str) -> None:
    """Endpoints and the service name are not parsed: any value is accepted as is."""
    from taskscope._otlp.env import options_from_env

    options = options_from_env({variable: f" https://u:{CANARY}@collector:4318 "})
    assert list(options.values()) == [f"https://u:{CANARY}@collector:4318"]


def test_invalid_settings_never_quote_the_value() -> None:
    """Validation after parsing (span_mode, OTLP protocol) does not echo values either."""
    from taskscope.otlp import setup_otlp

    with pytest.raises(ValueError, match="span_mode") as info:
        Telemetry(span_mode=CANARY)  # type: ignore[arg-type]
    assert CANARY not in str(info.value)
    with pytest.raises(ValueError, match="protocol") as info:
        setup_otlp(protocol=CANARY)
    assert CANARY not in str(info.value)


def test_error_type_caps_are_validated() -> None:
    """The new caps must be at least 1."""
    with pytest.raises(ValueError, match="max_error_types_per_task"):
        Telemetry(max_error_types_per_task=0)
    with pytest.raises(ValueError, match="max_error_types"):
        Telemetry(max_error_types=0)
