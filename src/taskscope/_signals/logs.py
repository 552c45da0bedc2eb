"""structlog events from the ``taskscope`` logger (taskscope never configures structlog)."""

from __future__ import annotations

from typing import Any

from taskscope._record import BlockRecord, HungRecord, TaskRecord
from taskscope._safe import safe_text


def _ids(trace_id: str | None, span_id: str | None) -> dict[str, str]:
    """The trace and span ids that exist: no ``trace_id=None`` on events without a span."""
    ids = {}
    if trace_id:
        ids["trace_id"] = trace_id
    if span_id:
        ids["span_id"] = span_id
    return ids


class LogEvents:
    def __init__(self, logger: Any) -> None:
        self._logger = logger

    def record(self, record: TaskRecord) -> None:
        if record.outcome == "failure":
            self._logger.error(
                "task.failed",
                task=record.name,
                duration_s=round(record.duration, 6),
                error_type=safe_text(record.error_type or ""),
                error=safe_text(record.error_message or ""),
                sync=record.sync,
                hung_reported=record.hung_reported,
                **_ids(record.trace_id, record.span_id),
            )
        elif record.hung_reported:
            # The end of a task that was reported as hung (``task.hung``).
            self._logger.info(
                "task.hung_ended",
                task=record.name,
                outcome=record.outcome,
                duration_s=round(record.duration, 6),
                hung_reported=True,
                **_ids(record.trace_id, record.span_id),
            )
        elif record.outcome == "skipped":
            self._logger.warning(
                "task.skipped",
                task=record.name,
                reason=record.reason or "an earlier task of the same response failed",
                **_ids(record.trace_id, record.span_id),
            )
        elif record.outcome in ("revoked", "rejected", "retry"):
            # Queue workers only (taskscope.celery, taskscope.taskiq).
            log = self._logger.info if record.outcome == "retry" else self._logger.warning
            log(
                f"task.{record.outcome}",
                task=record.name,
                reason=record.reason,
                error_type=record.error_type,
                trace_id=record.trace_id,
                span_id=record.span_id,
            )
        elif record.outcome == "abandoned":
            self._logger.warning(
                "task.abandoned",
                task=record.name,
                duration_s=round(record.duration, 6),
                **_ids(record.trace_id, record.span_id),
            )

    def block_detected(self, block: BlockRecord) -> None:
        self._logger.warning(
            "task.loop_blocked",
            task=block.task,
            duration_s=round(block.duration, 6),
            ongoing=block.ongoing,
            location=safe_text(block.location),
            # structlog reserves "stack" for a formatted stack string (ConsoleRenderer
            # raises on a list, which silently lost every loop_blocked event).
            stack=safe_text("\n".join(block.stack)),
            sampled=block.sampled,
            **_ids(block.trace_id, block.span_id),
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
            **_ids(hung.trace_id, hung.span_id),
        )

    def block_ended(self, block: BlockRecord) -> None:
        self._logger.info(
            "task.loop_unblocked",
            task=block.task,
            duration_s=round(block.duration, 6),
            location=safe_text(block.location),
            **_ids(block.trace_id, block.span_id),
        )

    def warning(self, name: str, kind: str, **details: Any) -> None:
        ids = _ids(details.pop("trace_id", None), details.pop("span_id", None))
        self._logger.warning(f"task.{kind}", task=name, **details, **ids)

    def abandoned_summary(self, names: dict[str, int]) -> None:
        self._logger.warning(
            "taskscope.abandoned",
            count=sum(names.values()),
            tasks=dict(sorted(names.items())),
        )
