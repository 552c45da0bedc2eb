"""structlog events from the ``taskscope`` logger (taskscope never configures structlog)."""

from __future__ import annotations

from typing import Any

from taskscope._record import BlockRecord, HungRecord, TaskRecord


class LogEvents:
    def __init__(self, logger: Any) -> None:
        self._logger = logger

    def record(self, record: TaskRecord) -> None:
        if record.outcome == "failure":
            self._logger.error(
                "task.failed",
                task=record.name,
                duration_s=round(record.duration, 6),
                error_type=record.error_type,
                error=record.error_message,
                sync=record.sync,
                trace_id=record.trace_id,
                span_id=record.span_id,
                hung_reported=record.hung_reported,
            )
        elif record.hung_reported:
            # The end of a task that was reported as hung (``task.hung``).
            self._logger.info(
                "task.hung_ended",
                task=record.name,
                outcome=record.outcome,
                duration_s=round(record.duration, 6),
                hung_reported=True,
                trace_id=record.trace_id,
                span_id=record.span_id,
            )
        elif record.outcome == "skipped":
            self._logger.warning(
                "task.skipped",
                task=record.name,
                reason=record.reason or "an earlier task of the same response failed",
                trace_id=record.trace_id,
                span_id=record.span_id,
            )
        elif record.outcome == "abandoned":
            self._logger.warning(
                "task.abandoned",
                task=record.name,
                duration_s=round(record.duration, 6),
                trace_id=record.trace_id,
                span_id=record.span_id,
            )

    def block_detected(self, block: BlockRecord) -> None:
        self._logger.warning(
            "task.loop_blocked",
            task=block.task,
            duration_s=round(block.duration, 6),
            ongoing=block.ongoing,
            location=block.location,
            # structlog reserves "stack" for a formatted stack string (ConsoleRenderer
            # raises on a list, which silently lost every loop_blocked event).
            stack="\n".join(block.stack),
            sampled=block.sampled,
            trace_id=block.trace_id,
            span_id=block.span_id,
        )

    def hung_detected(self, hung: HungRecord) -> None:
        self._logger.warning(
            "task.hung",
            task=hung.task,
            age_s=round(hung.age, 3),
            sync=hung.sync,
            location=hung.location,
            stack="\n".join(hung.stack),  # a string: structlog reserves "stack" (see above)
            report=hung.report,
            trace_id=hung.trace_id,
            span_id=hung.span_id,
        )

    def block_ended(self, block: BlockRecord) -> None:
        self._logger.info(
            "task.loop_unblocked",
            task=block.task,
            duration_s=round(block.duration, 6),
            location=block.location,
            trace_id=block.trace_id,
            span_id=block.span_id,
        )

    def warning(self, name: str, kind: str, **details: Any) -> None:
        self._logger.warning(f"task.{kind}", task=name, **details)

    def abandoned_summary(self, names: dict[str, int]) -> None:
        self._logger.warning(
            "taskscope.abandoned",
            count=sum(names.values()),
            tasks=dict(sorted(names.items())),
        )
