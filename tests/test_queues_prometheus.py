"""The dashboard and alerts against a real Prometheus scraping a web app and its worker.

The web app (``tests/queueweb.py``, job ``web``) publishes Celery tasks through
``queued()``; a prefork Celery worker (job ``worker``, multiprocess mode, its own metrics
port) runs them. Two workload rounds, one before Prometheus starts, one after, so every
``rate()`` has an increase. Then the dashboard's task queries, filtered to the worker job,
must return finite data, and the failure alert must be pending for the worker's failures.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.prometheus_server import (
    PrometheusServer,
    finite_values,
    free_port,
    running_prometheus,
    wait_for,
)
from tests.queue_services import (
    Worker,
    celery_command,
    running_worker,
    settle_equal,
    stop_process_group,
)
from tests.queueweb import WORKER_OUTCOMES_PER_REQUEST
from tests.test_celery import ping_ready, totals, use_broker
from tests.test_prometheus_e2e import ALERTS, VARIABLES, dashboard_queries, substitute

pytestmark = [pytest.mark.slow, pytest.mark.prometheus]

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 10  # the failure-ratio alert wants 10 runs of a task in 5 minutes
Q = "celery"  # the default queue: the web app publishes as an app that sets none would
# The families a worker job has: the dashboard's task panels.
TASK_FAMILIES = (
    "taskscope_tasks_total",
    "taskscope_task_failures_total",
    "taskscope_task_duration_seconds",
    "taskscope_task_wait_seconds",
    "taskscope_tasks_in_progress",
)


# Celery's pool processes run no event loop: the loop panels have no worker data.
LOOP_FAMILIES = ("taskscope_task_loop_", "taskscope_event_loop_")


def task_queries() -> list[tuple[str, str]]:
    return [
        (t, e)
        for t, e in dashboard_queries()
        if any(f in e for f in TASK_FAMILIES) and not any(f in e for f in LOOP_FAMILIES)
    ]


def worker_substitute(expr: str) -> str:
    saved = VARIABLES["job"]
    VARIABLES["job"] = "worker"
    try:
        return substitute(expr)
    finally:
        VARIABLES["job"] = saved


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body


@pytest.fixture(scope="module")
def stack(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[PrometheusServer, Worker]]:
    use_broker(redis_url)
    workdir = tmp_path_factory.mktemp("queue-e2e")
    env = {"TASKSCOPE_TEST_BROKER": redis_url, "TASKSCOPE_TEST_QUEUE": Q}
    web_port = free_port()
    web_log = (workdir / "web.log").open("wb")
    web = subprocess.Popen(
        [sys.executable, "-c", "from tests.queueweb import main; main()", "--port", str(web_port)],
        cwd=ROOT,
        env={**env, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        stdin=subprocess.DEVNULL,
        stdout=web_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    web_url = f"http://127.0.0.1:{web_port}"
    try:
        with running_worker(
            workdir, celery_command(Q, "prefork"), env, multiprocess=True, ready=ping_ready
        ) as worker:
            wait_for(lambda: _get(web_url + "/metrics") is not None, timeout=20, what="web app")

            def round_trip(rounds: int) -> None:
                assert _get(web_url + "/publish") == b"ok"
                expected = {k: v * rounds for k, v in WORKER_OUTCOMES_PER_REQUEST.items()}
                settle_equal(lambda: totals(worker), expected, what="worker outcomes")

            round_trip(1)
            jobs = {"web": [f"127.0.0.1:{web_port}"], "worker": [worker.metrics_url[7:-8]]}
            with running_prometheus(workdir, [], [ALERTS], jobs=jobs) as prometheus:
                total = 'sum(taskscope_tasks_total{job="worker"})'
                per_round = sum(WORKER_OUTCOMES_PER_REQUEST.values())
                wait_for(lambda: prometheus.value(total) == per_round, timeout=30, what=total)
                # Enough runs in Prometheus's window for the ratio alerts' minimum traffic.
                for rounds in range(2, ROUNDS + 1):
                    round_trip(rounds)
                wait_for(
                    lambda: prometheus.value(total) == ROUNDS * per_round, timeout=15, what=total
                )
                yield prometheus, worker
    finally:
        stop_process_group(web)
        web_log.close()


@pytest.mark.parametrize("expr", [e for _, e in task_queries()], ids=[t for t, _ in task_queries()])
def test_dashboard_task_queries_have_worker_data(
    stack: tuple[PrometheusServer, Worker], expr: str
) -> None:
    """Every task panel of the dashboard shows the worker job (finite values)."""
    prometheus, _ = stack
    result = prometheus.query(worker_substitute(expr))
    assert result, f"no worker data for {worker_substitute(expr)}"
    finite_values(result)
    assert {sample["metric"].get("job", "worker") for sample in result} == {"worker"}


def test_worker_counts_as_scraped(stack: tuple[PrometheusServer, Worker]) -> None:
    """Prometheus has the worker's exact counts (prefork processes merged), and the web
    job its publish tasks, apart."""
    prometheus, _ = stack
    worker = {
        (s["metric"]["task"], s["metric"]["outcome"]): float(s["value"][1])
        for s in prometheus.query('sum by (task, outcome) (taskscope_tasks_total{job="worker"})')
        if float(s["value"][1])  # the series created at 0 for the alert rules
    }
    assert worker == {k: ROUNDS * v for k, v in WORKER_OUTCOMES_PER_REQUEST.items()}
    web = prometheus.query('sum by (task) (taskscope_tasks_total{job="web"})')
    assert {s["metric"]["task"] for s in web} == {
        f"publish:tests.celeryapp.{name}" for name in ("ok", "fails", "retry_once", "ignored")
    }


def test_failure_alert_covers_worker_failures(stack: tuple[PrometheusServer, Worker]) -> None:
    """The failure-ratio alert (for: 10m) is pending for the worker's failing task."""
    prometheus, _ = stack

    def pending() -> list[dict[str, str]] | None:
        found = [
            a["labels"]
            for a in prometheus.get("/api/v1/alerts")["alerts"]
            if a["labels"]["alertname"] == "TaskscopeTaskFailureRatioHigh"
            and a["state"] in ("pending", "firing")
        ]
        return found or None

    labels = wait_for(pending, timeout=15, what="TaskscopeTaskFailureRatioHigh")
    assert {(la["job"], la["task"]) for la in labels} == {("worker", "tests.celeryapp.fails")}


def test_job_variable_lists_the_worker(stack: tuple[PrometheusServer, Worker]) -> None:
    """The dashboard's job drop-down offers the web app and the worker."""
    prometheus, _ = stack
    jobs = prometheus.get_or_error(
        "/api/v1/label/job/values", **{"match[]": "taskscope_tasks_total"}
    )
    assert set(jobs) == {"web", "worker"}


def test_alerts_without_for_fire_for_the_worker(stack: tuple[PrometheusServer, Worker]) -> None:
    """Alerts without ``for:`` fire at once for the worker job (Ignore -> skipped)."""
    prometheus, _ = stack

    def firing() -> set[tuple[str, str, str]] | None:
        found = {
            (a["labels"]["alertname"], a["labels"].get("job", ""), a["labels"].get("task", ""))
            for a in prometheus.get("/api/v1/alerts")["alerts"]
            if a["state"] == "firing"
        }
        return found or None

    found = wait_for(firing, timeout=15, what="a firing alert")
    assert ("TaskscopeTasksSkipped", "worker", "tests.celeryapp.ignored") in found
