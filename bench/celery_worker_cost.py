"""taskscope's cost per task in a real Celery worker, as a share of the worker's own.

    .venv/bin/python bench/celery_worker_cost.py          # needs redis-server
    .venv/bin/python bench/celery_worker_cost.py --quick

One ``redis-server`` and three ``celery worker --pool=solo`` processes, one per variant
(``celery`` plain, ``ts-metrics``, ``ts-full``; see ``celery_bench_app.py``), each on its own
queue, all started and warmed up first. Each round publishes N no-op tasks to one worker at
a time (variant order alternating per round) and reads the worker's CPU time (user + system,
``/proc``) before and after it drained them: CPU per task, medians over the rounds. The
plain worker's figure is Celery's whole per-task cost (receive from redis, decode, request,
trace, ack), the denominator of the share.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import BENCH, median, print_environment

VARIANTS = ("celery", "ts-metrics", "ts-full")
TICKS = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its reaped children (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:13]) / TICKS


def _redis(command: bytes, port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(command)
        return sock.recv(256)


def _queue_length(queue: str, port: int) -> int:
    reply = _redis(f"LLEN {queue}\r\n".encode(), port)
    return int(reply[1:].split(b"\r\n", 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--tasks", type=int, default=3000)
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    n = 1000 if args.quick else args.tasks
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("needs redis-server (Debian: apt-get install redis-server)")
    print_environment()
    port = _free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    workdir = Path(tempfile.mkdtemp(prefix="celery-bench-"))
    redis = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if _redis(b"PING\r\n", port).startswith(b"+PONG"):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)
        os.environ["TASKSCOPE_BENCH_BROKER"] = broker
        sys.path.insert(0, str(BENCH))
        from celery_bench_app import app, noop

        for variant in VARIANTS:
            env = {
                **os.environ,
                "TASKSCOPE_BENCH_VARIANT": variant,
                "PYTHONPATH": str(BENCH),
            }
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
            workers[variant] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "celery_bench_app",
                    "worker",
                    "--pool=solo",
                    "-Q",
                    variant,
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                    "--loglevel=WARNING",
                    f"--hostname={variant}@bench",
                ],
                cwd=BENCH,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=(workdir / f"{variant}.log").open("wb"),
            )

        def run(variant: str, count: int) -> float:
            pid = workers[variant].pid
            before = _cpu_seconds(pid)
            for i in range(count):
                noop.apply_async((i,), queue=variant)
            while _queue_length(variant, port):
                time.sleep(0.02)
            time.sleep(0.3)  # the last prefetched messages (an idle worker costs ~0 CPU)
            return (_cpu_seconds(pid) - before) / count * 1e6

        for variant in VARIANTS:  # warm-up: imports, connections, first-use caches
            run(variant, 300)
        results: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for index in range(rounds):
            order = VARIANTS if index % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                results[variant].append(run(variant, n))
        app.pool.force_close_all()
    finally:
        for process in workers.values():
            process.send_signal(signal.SIGTERM)
        for process in workers.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        redis.terminate()
        redis.wait()
    medians = {v: median(values) for v, values in results.items()}
    base = medians["celery"]
    print(f"# celery solo worker, CPU per task ({rounds} rounds x {n} tasks, redis broker)")
    print(f"{'variant':<12} {'us/task':>9} {'added us':>9} {'share of celery':>16}")
    for variant, value in medians.items():
        share = f"{(value - base) / base:+.1%}" if variant != "celery" else "-"
        print(f"{variant:<12} {value:9.1f} {value - base:9.1f} {share:>16}")
    metrics_share = (medians["ts-metrics"] - base) / base
    verdict = "met" if metrics_share <= 0.05 else "MISSED"
    print(
        f"celery worker, metrics only <= 5% of its per-task CPU: {metrics_share:.1%} -> {verdict}"
    )


if __name__ == "__main__":
    main()
