"""End-to-end HTTP: every variant served by uvicorn, loaded by wrk, interleaved.

One uvicorn process per variant (1 worker, 127.0.0.1, --no-access-log; by default uvloop +
httptools when installed, else asyncio + h11; ``--loop``/``--http`` choose; printed).
All servers start first and are warmed up; then each round loads every variant once, in
a shuffled order, with ``wrk -t1 -c16 -dDs --latency``. Figures are medians over rounds
of req/s, p99 and the server's CPU time per request, with ratios against ``plain`` (FastAPI,
no telemetry) from the same run. The CPU time comes from ``/proc/<pid>/task/*/schedstat``
(time on a CPU, all threads of the server) over each wrk run, divided by the requests wrk
completed: on a shared, noisy machine it holds to a few percent where req/s swings by tens.
``CPU x plain`` is plain's CPU per request over the variant's: the throughput ratio one core
would give, comparable with ``req/s x plain``.

    .venv/bin/python bench/http_load.py [--quick] [--rounds N] [--duration S]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import suppress
from pathlib import Path
from typing import NamedTuple

from common import BENCH, ROOT, median, print_environment, table, verdict
from variants import VARIANTS

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def server_flags(loop: str = "auto", http: str = "auto") -> tuple[str, str]:
    """uvicorn's fastest installed choices unless told otherwise."""
    if loop == "auto":
        loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    if http == "auto":
        http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return loop, http


class Server:
    def __init__(self, variant: str, tasks: str, loop: str, http: str, freeze: bool) -> None:
        self.variant = variant
        self.port = free_port()
        env = dict(os.environ, BENCH_VARIANT=variant, BENCH_TASKS=tasks)
        if freeze:
            env["BENCH_GC_FREEZE"] = "1"
        env["PYTHONPATH"] = os.pathsep.join([str(BENCH), str(ROOT / "src")])
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "apps:app",
                "--app-dir",
                str(BENCH),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--loop",
                loop,
                "--http",
                http,
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hit"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                msg = f"server {self.variant} exited: {err[-2000:]}"
                raise RuntimeError(msg)
            with suppress(OSError), urllib.request.urlopen(self.url, timeout=1) as response:
                if response.status == 200:
                    return
            time.sleep(0.1)
        msg = f"server {self.variant} did not start"
        raise RuntimeError(msg)

    def cpu_seconds(self) -> float:
        """Time on a CPU so far, all threads of the server process (schedstat, ns)."""
        total = 0
        for stat in Path(f"/proc/{self.proc.pid}/task").glob("*/schedstat"):
            with suppress(OSError, ValueError, IndexError):  # a thread that just ended
                total += int(stat.read_text().split()[0])
        return total / 1e9

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wrk(url: str, duration: float, connections: int) -> tuple[float, float, int]:
    """(requests per second, p99 latency in ms, requests completed) of one wrk run."""
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration:g}s",
            "--latency",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    if p99 is None:
        msg = f"no p99 in wrk output:\n{out}"
        raise RuntimeError(msg)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        msg = f"{url}: {errors.group(1)} non-2xx responses"
        raise RuntimeError(msg)
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return rps, float(p99.group(1)) * _UNITS[p99.group(2)] * 1e3, done


class Sample(NamedTuple):
    rps: float
    p99_ms: float
    cpu_us: float  # server CPU time per request


def load(server: Server, duration: float, connections: int) -> Sample:
    before = server.cpu_seconds()
    rps, p99, done = wrk(server.url, duration, connections)
    cpu = server.cpu_seconds() - before
    return Sample(rps, p99, cpu / max(done, 1) * 1e6)


def measure(
    names: tuple[str, ...],
    rounds: int,
    duration: float,
    connections: int,
    tasks: str,
    flags: tuple[str, str],
    freeze: bool = False,
) -> dict[str, Sample]:
    """Median req/s, p99 and CPU per request, per variant."""
    servers = {name: Server(name, tasks, *flags, freeze) for name in names}
    try:
        for server in servers.values():
            server.wait_ready()
        for server in servers.values():  # warm-up: imports, caches, the loop probe
            wrk(server.url, min(2.0, duration), connections)
        samples: dict[str, list[Sample]] = {name: [] for name in names}
        rng = random.Random(2)
        for _ in range(rounds):
            order = list(names)
            rng.shuffle(order)
            for name in order:
                samples[name].append(load(servers[name], duration, connections))
    finally:
        for server in servers.values():
            server.stop()
    return {
        name: Sample(*(median([s[i] for s in values]) for i in range(3)))
        for name, values in samples.items()
    }


TARGETS = {
    # variant: (min throughput ratio, by CPU per request; max p99 ratio)
    "ts-metrics": (0.97, 1.1),
    "ts-full": (0.85, 2.0),
}


def report(result: dict[str, Sample]) -> tuple[str, list[tuple[str, str, bool]]]:
    base = result["plain"]
    rows = []
    checks: list[tuple[str, str, bool]] = []
    for name, sample in result.items():
        cpu_ratio = base.cpu_us / sample.cpu_us
        rows.append(
            [
                name,
                sample.rps,
                sample.rps / base.rps,
                sample.cpu_us,
                cpu_ratio,
                sample.p99_ms,
                sample.p99_ms / base.p99_ms,
            ]
        )
        if name in TARGETS:
            minimum, max_p99 = TARGETS[name]
            q = sample.p99_ms / base.p99_ms
            checks.append(
                (f"http: {name} CPU x plain >= {minimum}", f"{cpu_ratio:.2f}", cpu_ratio >= minimum)
            )
            checks.append((f"http: {name} p99 x plain <= {max_p99}", f"{q:.2f}", q <= max_p99))
    text = table(
        [
            "variant",
            "req/s",
            "req/s x plain",
            "CPU µs/req",
            "CPU x plain",
            "p99 ms",
            "p99 x plain",
        ],
        rows,
    )
    return text, checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s per variant")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--duration", type=float, default=None, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--tasks", choices=("async", "mixed"), default="async")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    parser.add_argument("--http", choices=("auto", "h11", "httptools"), default="auto")
    parser.add_argument(
        "--gc-freeze", action="store_true", help="gc.freeze() in each app after startup"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found (Debian: apt-get install wrk; see scripts/ensure-system-tools)")
    rounds = args.rounds or (2 if args.quick else 4)
    duration = args.duration or (2.0 if args.quick else 5.0)
    names = tuple(args.variants.split(","))
    if "plain" not in names:
        names = ("plain", *names)
    loop, http = server_flags(args.loop, args.http)
    print_environment()
    print(
        f"# http: uvicorn 1 worker, --loop {loop} --http {http}; wrk -t1 -c{args.connections} "
        f"-d{duration:g}s; {rounds} rounds interleaved; GET /hit adds 2 tiny "
        f"{'async' if args.tasks == 'async' else 'async + sync'} tasks"
        f"{'; gc.freeze() after startup' if args.gc_freeze else ''}"
    )
    text, checks = report(
        measure(names, rounds, duration, args.connections, args.tasks, (loop, http), args.gc_freeze)
    )
    print(text)
    for label, value, ok in checks:
        print(f"{label}: {value} -> {verdict(ok)}")


if __name__ == "__main__":
    main()
