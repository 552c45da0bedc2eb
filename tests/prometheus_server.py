"""A real Prometheus server for tests: the Debian ``prometheus`` binary as a plain process.

:func:`running_prometheus` starts it on ``127.0.0.1:<free port>`` with a temporary config
and data directory, scraping the given targets every second and evaluating the given rule
files every second, and stops it afterwards. :class:`PrometheusServer` wraps the HTTP API.
If the binary is missing the test is skipped, or fails when ``CI`` is set.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tests.system_tools import stop, system_tool

T = TypeVar("T")


class PrometheusError(AssertionError):
    """The Prometheus API answered with an error (bad PromQL, server trouble)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def prometheus_binary() -> str:
    """Path of ``prometheus``; skip (or fail on CI) when it is not installed."""
    return system_tool("prometheus", "prometheus")


def wait_for(
    probe: Callable[[], T | None], *, timeout: float, interval: float = 0.2, what: str
) -> T:
    """Poll ``probe`` until it returns something other than None/False (bounded)."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = probe()
        if last is not None and last is not False:
            return last
        if time.monotonic() > deadline:
            msg = f"timed out after {timeout} s waiting for {what} (last: {last!r})"
            raise TimeoutError(msg)
        time.sleep(interval)


class PrometheusServer:
    """Client for one running server's HTTP API (stdlib only; everything on 127.0.0.1)."""

    def __init__(self, url: str, log: Path) -> None:
        self.url = url
        self.log = log

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=5) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body}")
        return body["data"]

    def get_or_error(self, path: str, **params: str) -> Any:
        """Like :meth:`get`, but a 4xx answer (bad query) raises with Prometheus's message."""
        try:
            return self.get(path, **params)
        except urllib.error.HTTPError as exc:
            with exc:
                detail = exc.read().decode(errors="replace")
            raise PrometheusError(f"{path} {params}: HTTP {exc.code}: {detail}") from None

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant vector at the server's now; raises on any PromQL error."""
        data = self.get_or_error("/api/v1/query", query=expr)
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr!r} gave a {data['resultType']}, not a vector")
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The single value of ``expr`` now, or None while there is none."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def targets_up(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self.get("/api/v1/targets")["activeTargets"]
        return [t for t in active if t["health"] == "up"]

    def exemplars(self, expr: str, *, seconds: float = 600) -> list[dict[str, Any]]:
        now = time.time()
        data: list[dict[str, Any]] = self.get_or_error(
            "/api/v1/query_exemplars", query=expr, start=str(now - seconds), end=str(now)
        )
        return data

    def rules(self) -> list[dict[str, Any]]:
        return [rule for group in self.get("/api/v1/rules")["groups"] for rule in group["rules"]]


def finite_values(result: Sequence[dict[str, Any]]) -> list[float]:
    """The sample values of a vector result, asserting each one is a finite number."""
    values = [float(sample["value"][1]) for sample in result]
    for sample, value in zip(result, values, strict=True):
        assert math.isfinite(value), f"non-finite value {value} for {sample['metric']}"
    return values


def _config(
    targets: Sequence[str],
    rule_files: Sequence[Path],
    labels: Mapping[str, str],
    jobs: Mapping[str, Sequence[str]] | None = None,
) -> str:
    rules = "".join(f"\n  - {json.dumps(str(path))}" for path in rule_files)
    scrape = "".join(
        f"""
  - job_name: {json.dumps(job)}
    metrics_path: /metrics
    static_configs:
      - targets: {json.dumps(list(job_targets))}
        labels: {json.dumps(dict(labels))}"""
        for job, job_targets in (jobs or {"taskscope": targets}).items()
    )
    return f"""\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:{rules or " []"}
scrape_configs:{scrape}
"""


def _start(
    binary: str, config: Path, data: Path, log_path: Path
) -> tuple[subprocess.Popen[bytes], int]:
    """Start Prometheus on a free port; try another port if that one was taken meanwhile."""
    for _ in range(3):
        port = free_port()
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={data}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--enable-feature=exemplar-storage",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            process.wait(timeout=0.5)  # binding fails within milliseconds
        except subprocess.TimeoutExpired:
            return process, port
        if "address already in use" not in log_path.read_text():
            break
    raise RuntimeError(f"prometheus did not start: {log_path.read_text()[-2000:]}")


@contextmanager
def running_prometheus(
    workdir: Path,
    targets: Sequence[str],
    rule_files: Sequence[Path] = (),
    *,
    labels: Mapping[str, str] | None = None,
    startup_timeout: float = 20.0,
    jobs: Mapping[str, Sequence[str]] | None = None,
) -> Iterator[PrometheusServer]:
    """A Prometheus process scraping ``targets`` (host:port, /metrics) every second, as
    job ``taskscope``; or, with ``jobs``, each job's targets under that job name. ``labels``
    are added to every target (as Kubernetes service discovery adds ``namespace``)."""
    binary = prometheus_binary()
    config = workdir / "prometheus.yml"
    config.write_text(_config(targets, rule_files, labels or {}, jobs))
    (workdir / "data").mkdir()
    log_path = workdir / "prometheus.log"
    process, port = _start(binary, config, workdir / "data", log_path)
    server = PrometheusServer(f"http://127.0.0.1:{port}", log_path)
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=1) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        wait_for(ready, timeout=startup_timeout, what="prometheus /-/ready")
        yield server
    finally:
        stop(process)
