"""Multiprocess shutdown: gunicorn, two uvicorn workers, SIGTERM with tasks running/queued.

Counts come from the ``PROMETHEUS_MULTIPROC_DIR`` files after every process has exited.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from tests.reliability.harness import load, report, running

pytestmark = pytest.mark.slow  # real uvicorn processes: make test, not make check

HOLDS = 8  # 4 async + 4 sync tasks of 30 s, each with 2 queued behind it
QUICK = 50 * 8  # finished before the signal


def _counts(directory: Path) -> tuple[dict[str, float], float]:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    outcomes: dict[str, float] = {}
    in_progress = 0.0
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == "taskscope_tasks_total" and sample.value:
                key = sample.labels["outcome"]
                outcomes[key] = outcomes.get(key, 0.0) + sample.value
            elif sample.name == "taskscope_tasks_in_progress":
                in_progress += sample.value
    return outcomes, in_progress


@pytest.mark.parametrize(
    ("worker", "graceful"),
    [
        ("tests.reliability.workers.ShortGraceWorker", "5"),
        ("uvicorn_worker.UvicornWorker", "2"),
    ],
    ids=["uvicorn-grace-1s-under-gunicorn-5s", "gunicorn-kills-at-2s"],
)
def test_gunicorn_sigterm(tmp_path: Path, worker: str, graceful: str) -> None:
    """With uvicorn's graceful timeout under gunicorn's, every task of both workers ends in
    one outcome. Without it, gunicorn SIGKILLs the workers: the running tasks stay visible
    as in progress; their outcomes, and the queued tasks, are lost (known limit)."""
    multiproc = tmp_path / "multiproc"
    multiproc.mkdir()
    args = ["-w", "2", "-k", worker, "--graceful-timeout", graceful]
    env = {"PROMETHEUS_MULTIPROC_DIR": str(multiproc)}
    with running(tmp_path, env=env, args=args, gunicorn=True) as server:
        paths = ["/hold?kind=async&secs=30&queued=2"] * (HOLDS // 2)
        paths += ["/hold?kind=sync&secs=30&queued=2"] * (HOLDS // 2)
        paths += ["/work?n=8&fail_every=0"] * (QUICK // 8)
        load(server.base, paths, 60)
        time.sleep(0.5)  # the long tasks start right after their responses
        began = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(30)
        seconds = time.monotonic() - began
    outcomes, in_progress = _counts(multiproc)
    added = HOLDS * 3 + QUICK
    if worker.endswith("ShortGraceWorker"):
        assert outcomes == {"success": QUICK, "cancelled": HOLDS, "abandoned": HOLDS * 2}
        assert in_progress == 0
    else:
        assert outcomes == {"success": QUICK}
        assert in_progress == HOLDS
    report(
        f"shutdown/gunicorn-2-workers/{'uvicorn-grace-1' if 'Short' in worker else 'killed'}",
        added=added,
        outcomes=outcomes,
        in_progress_left=in_progress,
        shutdown_s=round(seconds, 2),
        returncode=server.process.returncode,
    )
