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
