"""Run blocking SDK calls (flush, shutdown) with a deadline the caller can rely on."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

_logger = logging.getLogger("taskscope.otlp")


def run_bounded(calls: dict[str, Callable[[], object]], timeout: float) -> bool:
    """Run each call in its own daemon thread, all at once; wait at most ``timeout``.

    Returns whether every call finished (without raising) in time. A call still running
    at the deadline is left to its daemon thread: a hung collector cannot hold the
    caller, nor the interpreter at exit. The SDK's own timeouts are not relied upon
    (``force_flush(timeout)`` ignores its timeout; shutdown waits up to 30 s).
    """
    outcomes: dict[str, bool] = {}

    def runner(name: str, call: Callable[[], object]) -> None:
        try:
            call()
        except Exception:
            _logger.warning("OTLP %s failed", name, exc_info=True)
            outcomes[name] = False
        else:
            outcomes[name] = True

    threads = [
        threading.Thread(
            target=runner, args=(name, call), name=f"taskscope-otlp-{name}", daemon=True
        )
        for name, call in calls.items()
    ]
    deadline = time.monotonic() + max(timeout, 0.0)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
    late = [name for name in calls if name not in outcomes]
    if late:
        _logger.warning(
            "OTLP %s did not finish within %.1f s; left behind", ", ".join(late), timeout
        )
    return not late and all(outcomes.values())
