"""The sink interface: what taskscope feeds with every record, block, hang and lag.

Prometheus, OpenTelemetry metrics, the log events and ``taskscope.testing`` are sinks; a
user's sink is passed as ``Telemetry(sinks=[...])`` and gets the same stream. Subclass
:class:`Sink` and override the methods you want (its defaults do nothing); any object with
some of these methods works too. Methods are called on the thread that saw the event (the
event loop for records, the watchdog thread for stalls and hung tasks), must be quick and
must not block; what they raise is absorbed and counted
(``taskscope_instrumentation_errors_total{signal="sinks"}``), never passed to the app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskscope._record import BlockRecord, HungRecord, TaskRecord

SINK_METHODS = ("record", "block_detected", "block_ended", "hung_detected", "lag", "warning")


class Sink:
    """Receives taskscope's events: override any of these methods (the defaults ignore)."""

    def record(self, record: TaskRecord) -> None:
        """One task ended in an outcome (exactly once per task added)."""
        return

    def block_detected(self, block: BlockRecord) -> None:
        """The loop has been blocked past the threshold (``block.ongoing``: still is)."""
        return

    def block_ended(self, block: BlockRecord) -> None:
        """A block is over: ``block.duration`` is its length."""
        return

    def hung_detected(self, hung: HungRecord) -> None:
        """A task has run past ``hung_after`` (again at each back-off step)."""
        return

    def lag(self, seconds: float) -> None:
        """One measurement of the event loop's lag."""
        return

    def warning(self, name: str, kind: str) -> None:
        """A misuse or a bound reached (``kind``: see ``taskscope_task_warnings_total``)."""
        return


def _ignore(*_: object) -> None:
    return None


class AdaptedSink:
    """A user's sink with the methods it lacks filled in (no-ops), so the runtime's loops
    call every sink alike and a missing method is not an instrumentation error."""

    def __init__(self, sink: object) -> None:
        self.sink = sink
        for method in SINK_METHODS:
            found: Any = getattr(sink, method, None)
            setattr(self, method, found if callable(found) else _ignore)
        # Whether the sink does something with task records: one that does not (a
        # stall or hang watcher) leaves the runtime's batched hot path on.
        own = getattr(type(sink), "record", None)
        self.wants_records = callable(getattr(sink, "record", None)) and own is not Sink.record
