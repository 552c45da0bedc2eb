"""``taskscope demo --scale-out``: the report task moves to a Celery worker.

Starts ``redis-server`` (Debian package ``redis-server``) on a free 127.0.0.1 port and a
``celery worker`` (``taskscope.demo.worker``, thread pool) as child processes, or, with
``--broker URL``, uses a broker that already runs (the worker is then yours to start). The
web app publishes ``render_report`` with :func:`taskscope.celery.queued` after each
response; the worker records the run under the same task name, on its own ``/metrics``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskscope import Telemetry

HOW_TO_GET_REDIS = (
    "--scale-out needs redis-server (Debian/Ubuntu: sudo apt-get install redis-server; "
    "macOS: brew install redis), or point --broker at a running redis "
    "(docker run -p 6379:6379 redis:7) and start the worker yourself: "
    "TASKSCOPE_DEMO_BROKER=redis://localhost:6379/0 celery -A taskscope.demo.worker worker"
)


class ScaleOutError(RuntimeError):
    """The scale-out pieces could not be started (the message says how to get them)."""


@dataclass
class ScaleOut:
    report_task: Any
    broker: str
    worker_metrics: str | None
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def note(self) -> str:
        where = f"; worker metrics: {self.worker_metrics}" if self.worker_metrics else ""
        return f"scale-out: reports are published to Celery at {self.broker}{where}"

    def stop(self) -> None:
        for child in reversed(self.children):  # the worker first, then redis
            if child.poll() is None:
                stop_process(child)


def stop_process(process: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL if the process has not exited 10 s later; reaped either way
    (the tests stop the processes they start with it too)."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait(probe: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            msg = f"scale-out: {what} did not start within {timeout:.0f} s"
            raise ScaleOutError(msg)
        time.sleep(0.1)


def redis_answers(port: int) -> bool:
    """Whether a redis-server on 127.0.0.1:``port`` answers PING (the tests use it too)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _serves(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - 127.0.0.1
            return bool(response.status == 200)
    except OSError:
        return False


def start_scale_out(broker: str | None, telemetry: Telemetry) -> ScaleOut:
    """Start what is missing and instrument the demo's Celery app for publishing."""
    try:
        from taskscope.celery import instrument_celery
        from taskscope.demo.queue import celery_app, render_report
    except ImportError as exc:
        msg = f"--scale-out needs Celery: pip install 'taskscope[demo,celery]' redis ({exc})"
        raise ScaleOutError(msg) from exc
    scale = ScaleOut(render_report, broker or "", None)
    try:
        if broker is None:
            binary = shutil.which("redis-server")
            if binary is None:
                raise ScaleOutError(HOW_TO_GET_REDIS)
            port = _free_port()
            scale.broker = f"redis://127.0.0.1:{port}/0"
            scale.children.append(
                subprocess.Popen(  # noqa: S603 - the redis-server found on PATH, fixed args
                    [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            _wait(lambda: redis_answers(port), "redis-server")
            metrics_port = _free_port()
            scale.worker_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
            env = {
                **os.environ,
                "TASKSCOPE_DEMO_BROKER": scale.broker,
                "TASKSCOPE_DEMO_WORKER_METRICS_PORT": str(metrics_port),
            }
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # a thread pool: one process
            scale.children.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "celery",
                        "-A",
                        "taskscope.demo.worker",
                        "worker",
                        "--pool=threads",
                        "--concurrency=4",
                        "--without-gossip",
                        "--without-mingle",
                        "--without-heartbeat",
                        "--loglevel=WARNING",
                    ],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            _wait(lambda: _serves(scale.worker_metrics or ""), "the Celery worker")
        celery_app.conf.broker_url = scale.broker
        instrument_celery(celery_app, telemetry)
    except BaseException:
        scale.stop()
        raise
    return scale
