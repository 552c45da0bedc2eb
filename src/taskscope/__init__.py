"""taskscope: observable background tasks for Starlette and FastAPI.

Change ``from fastapi import BackgroundTasks`` (or Starlette's import) to
``from taskscope import BackgroundTasks``; every task then gets a span, metrics, loop-block
detection and log events. See the README for configuration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from taskscope._config import SpanMode, Telemetry
from taskscope._instrumentor import (
    TaskscopeInstrumentor,
    TelemetryMiddleware,
    instrument,
    instrument_app,
    uninstrument,
    uninstrument_app,
)
from taskscope._naming import task_name
from taskscope._probe import lifespan, start_loop_probe
from taskscope._record import OUTSIDE_TASKS, BlockRecord, HungRecord, Outcome, TaskRecord
from taskscope._redact import redact_secrets
from taskscope._sink import Sink

if TYPE_CHECKING:
    from taskscope._background import BackgroundTask, BackgroundTasks
    from taskscope.exposition import MetricsApp, start_metrics_server

__all__ = (
    "BackgroundTask",
    "BackgroundTasks",
    "BlockRecord",
    "HungRecord",
    "MetricsApp",
    "OUTSIDE_TASKS",
    "Outcome",
    "Sink",
    "SpanMode",
    "TaskRecord",
    "TaskscopeInstrumentor",
    "Telemetry",
    "TelemetryMiddleware",
    "instrument",
    "instrument_app",
    "lifespan",
    "redact_secrets",
    "start_loop_probe",
    "start_metrics_server",
    "task_name",
    "uninstrument",
    "uninstrument_app",
)


def __getattr__(name: str) -> Any:
    # Importing the drop-in classes (not `import taskscope`) is what makes FastAPI build
    # taskscope's BackgroundTasks for `BackgroundTasks` parameters: see taskscope._fastapi.
    if name in ("BackgroundTask", "BackgroundTasks"):
        from taskscope import _background, _fastapi

        _fastapi.ensure_bound()
        value = getattr(_background, name)
        globals()[name] = value
        return value
    if name in ("MetricsApp", "start_metrics_server"):
        from taskscope import exposition

        value = getattr(exposition, name)
        globals()[name] = value
        return value
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("taskscope")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree
            from taskscope._version import __version__

            return __version__
    msg = f"module 'taskscope' has no attribute {name!r}"
    raise AttributeError(msg)
