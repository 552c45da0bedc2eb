"""Multiprocess servers: task counts from every worker sum exactly through MetricsApp.

A tiny FastAPI app (written to a temp dir) runs as a real subprocess on 127.0.0.1 with
``PROMETHEUS_MULTIPROC_DIR`` set; requests are spread over two workers; ``/metrics``
(``MetricsApp()`` with the default registry) merges the workers' files at scrape time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

APP = textwrap.dedent(
    """
    import os

    from fastapi import FastAPI

    from taskscope import BackgroundTasks
    from taskscope.exposition import MetricsApp

    app = FastAPI()
    app.mount("/metrics", MetricsApp())


    def sync_job() -> None:
        pass


    async def async_job() -> None:
        pass


    @app.get("/work")
    async def work(tasks: BackgroundTasks) -> dict[str, int]:
        tasks.add_task(sync_job)
        tasks.add_task(async_job)
        return {"pid": os.getpid()}
    """
)
GUNICORN_CONF = textwrap.dedent(
    """
    from taskscope.exposition import mark_process_dead


    def child_exit(server, worker):
        mark_process_dead(worker.pid)
    """
)
TASKS_PER_REQUEST = 2
TASKS = {"mpapp.sync_job", "mpapp.async_job"}
DEADLINE = 25.0  # seconds for start-up, and again for the counts to settle


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running(
    command: list[str], cwd: Path, multiproc_dir: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Start the server in its own session; always terminate the whole group."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)}
    log = (cwd / "server.log").open("wb")
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


def _wait_ready(client: httpx.Client, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        with contextlib.suppress(httpx.TransportError):
            if client.get("/metrics/").status_code == 200:
                return
        time.sleep(0.1)
    pytest.fail(f"server did not start:\n{log.read_text()}")


def _send_until_both_workers(client: httpx.Client, minimum: int) -> tuple[int, set[int]]:
    """Send at least ``minimum`` requests, concurrently, until two workers answered."""
    pids: set[int] = set()
    sent = 0

    def one(_: int) -> int:
        response = client.get("/work", headers={"Connection": "close"})
        response.raise_for_status()
        return int(response.json()["pid"])

    with ThreadPoolExecutor(8) as pool:
        while sent < minimum or (len(pids) < 2 and sent < 400):
            pids.update(pool.map(one, range(20)))
            sent += 20
    assert len(pids) == 2, f"all {sent} requests went to one worker"
    return sent, pids


def _scrape(client: httpx.Client) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    families: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(client.get("/metrics/").text):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            families.setdefault(sample.name, {})[key] = sample.value
    return families


def _check_exact_counts(client: httpx.Client, requests: int) -> None:
    expected = requests * TASKS_PER_REQUEST
    deadline = time.monotonic() + DEADLINE
    while True:
        families = _scrape(client)
        totals = families.get("taskscope_tasks_total", {})
        in_progress = families.get("taskscope_tasks_in_progress", {})
        counts = families.get("taskscope_task_duration_seconds_count", {})
        # A record updates the counter, then the histogram: a scrape can fall in between.
        settled = (
            sum(totals.values()) == expected
            and sum(counts.values()) == expected
            and not any(in_progress.values())
        )
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sum(totals.values()) == expected
    # Exactly the two tasks, each succeeded once per request: no other or stale series.
    assert {dict(k)["task"] for k in totals} == TASKS
    counted = {k: v for k, v in totals.items() if v}
    assert {dict(k)["outcome"] for k in counted} == {"success"}
    assert all(value == requests for value in counted.values())
    # The other outcomes exist at 0 (for the alert rules), summed once across workers.
    zeros = {dict(k)["outcome"] for k, v in totals.items() if not v}
    assert zeros == {"failure", "cancelled", "skipped", "abandoned"}
    # livesum: one series per task, zero at rest (not one per worker).
    assert set(in_progress.values()) == {0.0}
    assert {dict(k)["task"] for k in in_progress} <= TASKS
    assert all(set(dict(k)) == {"task"} for k in in_progress)
    counts = families["taskscope_task_duration_seconds_count"]
    assert sum(counts.values()) == expected


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "mpapp.py").write_text(APP)
    (tmp_path / "gunicorn_conf.py").write_text(GUNICORN_CONF)
    (tmp_path / "prom").mkdir()
    return tmp_path


def test_uvicorn_workers_sum_exactly(app_dir: Path) -> None:
    """uvicorn --workers 2: tasks_total sums to N*k, in-progress livesum is 0 at rest."""
    port = _free_port()
    command = [
        sys.executable, "-m", "uvicorn", "mpapp:app", "--workers", "2",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    with (
        running(command, app_dir, app_dir / "prom") as proc,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
    ):
        _wait_ready(client, proc, app_dir / "server.log")
        requests, _ = _send_until_both_workers(client, minimum=40)
        _check_exact_counts(client, requests)
    assert len(list((app_dir / "prom").glob("counter_*.db"))) >= 2


def test_gunicorn_uvicorn_workers_sum_exactly(app_dir: Path) -> None:
    """gunicorn -k uvicorn_worker.UvicornWorker -w 2: exact sums; child_exit drops dead gauges."""
    port = _free_port()
    command = [
        sys.executable, "-m", "gunicorn", "mpapp:app", "-k", "uvicorn_worker.UvicornWorker",
        "-w", "2", "-b", f"127.0.0.1:{port}", "-c", "gunicorn_conf.py", "--log-level", "warning",
    ]  # fmt: skip
    with (
        running(command, app_dir, app_dir / "prom") as proc,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
    ):
        _wait_ready(client, proc, app_dir / "server.log")
        requests, pids = _send_until_both_workers(client, minimum=40)
        _check_exact_counts(client, requests)
        victim = min(pids)
        live_file = app_dir / "prom" / f"gauge_livesum_{victim}.db"
        assert live_file.exists()
        os.kill(victim, signal.SIGKILL)  # a worker of the server this test started
        deadline = time.monotonic() + DEADLINE
        while live_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not live_file.exists()  # gunicorn called child_exit -> mark_process_dead
        # Counters of the dead worker stay (they are history); the sums are unchanged.
        _check_exact_counts(client, requests)
