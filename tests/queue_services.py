"""Real services for the queue tests: ``redis-server`` and ``celery``/``taskiq`` workers.

Each runs as a plain child process on 127.0.0.1 (a free port) and is stopped afterwards.
A missing ``redis-server`` skips the test, or fails it when ``CI`` is set
(``scripts/ensure-system-tools`` installs it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from taskscope.demo.scaleout import redis_answers
from tests.prometheus_server import free_port, wait_for
from tests.system_tools import stop, system_tool

ROOT = Path(__file__).resolve().parent.parent


def redis_binary() -> str:
    return system_tool("redis-server", "redis-server")


@contextmanager
def running_redis(workdir: Path) -> Iterator[str]:
    """A throwaway ``redis-server`` (no persistence); yields its ``redis://`` URL."""
    binary = redis_binary()
    port = free_port()
    log = workdir / "redis.log"
    process = subprocess.Popen(
        [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            "--logfile", str(log),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for(lambda: process.poll() is None and redis_answers(port), timeout=10, what="redis")
        yield f"redis://127.0.0.1:{port}"
    finally:
        stop(process)


@dataclass
class Worker:
    """A running worker process and the files its telemetry writes."""

    process: subprocess.Popen[bytes]
    metrics_url: str
    spans_path: Path
    logs_path: Path
    output: Path

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of the worker's ``/metrics``: (name, sorted labels) -> value."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def value(self, name: str, **labels: str) -> float:
        return self.scrape().get((name, tuple(sorted(labels.items()))), 0.0)

    def spans(self) -> list[dict[str, Any]]:
        return _json_lines(self.spans_path)

    def logs(self) -> list[dict[str, Any]]:
        return _json_lines(self.logs_path)

    def log_text(self) -> str:
        return self.output.read_text(errors="replace")[-4000:]


def _json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _metrics_up(url: str, process: subprocess.Popen[bytes], output: Path) -> bool:
    if process.poll() is not None:
        raise RuntimeError(f"worker exited: {output.read_text(errors='replace')[-3000:]}")
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextmanager
def running_worker(
    workdir: Path,
    command: Sequence[str],
    env: Mapping[str, str],
    *,
    multiprocess: bool,
    ready: Any = None,
    startup_timeout: float = 30.0,
) -> Iterator[Worker]:
    """Start ``command`` (a worker) with the test telemetry's environment; stop it after.

    Ready when its metrics endpoint answers and ``ready()`` (if given) is true.
    """
    port = free_port()
    spans = workdir / "spans.jsonl"
    logs = workdir / "logs.jsonl"
    output = workdir / "worker.log"
    full_env = {
        **os.environ,
        **env,
        "TASKSCOPE_TEST_WORKER": "1",
        "TASKSCOPE_TEST_METRICS_PORT": str(port),
        "TASKSCOPE_TEST_SPANS": str(spans),
        "TASKSCOPE_TEST_LOGS": str(logs),
        "PYTHONPATH": str(ROOT),
    }
    full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if multiprocess:
        directory = workdir / "multiproc"
        directory.mkdir()
        full_env["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    with output.open("wb") as out:
        process = subprocess.Popen(
            list(command),
            cwd=ROOT,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/metrics"
    worker = Worker(process, url, spans, logs, output)
    try:
        wait_for(lambda: _metrics_up(url, process, output), timeout=startup_timeout, what=url)
        if ready is not None:
            wait_for(ready, timeout=startup_timeout, what="worker ready")
        yield worker
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM (a warm shutdown for celery), then SIGKILL for the whole group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def celery_command(queue: str, pool: str, concurrency: int = 2) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "tests.celeryapp", "worker",
        f"--pool={pool}", f"--concurrency={concurrency}", "-Q", queue,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--loglevel=INFO", f"--hostname={queue}@%h",
    ]  # fmt: skip


def settle(probe: Any, *, timeout: float = 30.0, what: str) -> Any:
    """Wait for the workers to catch up (bounded; no fixed sleeps)."""
    return wait_for(probe, timeout=timeout, interval=0.1, what=what)


def settle_equal(read: Any, expected: Any, *, timeout: float = 30.0, what: str) -> None:
    """Wait until ``read()`` equals ``expected``; on timeout, show the last reading."""
    last: list[Any] = [None]

    def probe() -> bool:
        last[0] = read()
        return bool(last[0] == expected)

    try:
        wait_for(probe, timeout=timeout, interval=0.1, what=what)
    except TimeoutError:
        raise AssertionError(f"{what}: expected {expected!r}, last read {last[0]!r}") from None
