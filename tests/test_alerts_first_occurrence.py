"""The alert rules fire on the *first* skip, failure, loop block and misuse of a task.

A counter series that appears with the value 1 has no increase for ``increase()`` or
``rate()`` to see. taskscope creates the series the rules read at 0 when it first sees a
task name; here a real Prometheus scrapes those zeros before anything goes wrong, then one
request makes every task misbehave once, and Prometheus's own rule evaluation must turn
each alert pending (rules with ``for:``) or firing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.prometheus_server import PrometheusServer, running_prometheus, wait_for
from tests.test_prometheus_e2e import ALERTS, App, alerts_with_for, get, serve_promapp

pytestmark = pytest.mark.prometheus

WARMUP_REQUESTS = 10  # the failure-ratio alert needs 10 runs in 5 minutes
# alert -> the task it must name
EXPECTED = {
    "TaskscopeTaskFailureRatioHigh": "tests.promapp.first_flaky",
    "TaskscopeTasksSkipped": "tests.promapp.first_skippable",
    "TaskscopeEventLoopBlocked": "tests.promapp.first_blocker",
    "TaskscopeTaskMisuse": "tests.promapp.first_misuser",
}


@pytest.fixture(scope="module")
def scraped_clean(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[App, PrometheusServer]]:
    """An app whose tasks ran cleanly, a Prometheus that scraped their zero series, and
    enough clean runs since for the failure ratio's minimum traffic."""
    workdir = tmp_path_factory.mktemp("first-occurrence")
    with serve_promapp(workdir / "app.log") as app:
        assert get(app.url + "/first/warmup")[1] == b"ok"
        (workdir / "prometheus").mkdir()
        with running_prometheus(workdir / "prometheus", [app.address], [ALERTS]) as server:
            zeros = 'count(taskscope_tasks_total{task=~"tests.promapp.first_.*"} == 0)'
            scrapes = 'count_over_time(up{job="taskscope"}[10m])'
            try:
                # 4 tasks x 5 outcomes, minus the 4 successes that are not zero.
                wait_for(lambda: server.value(zeros) == 16, timeout=30, what=zeros)
                wait_for(lambda: (server.value(scrapes) or 0) >= 2, timeout=10, what="2 scrapes")
            except TimeoutError as exc:
                raise TimeoutError(f"{exc}\n{app.log.read_text()[-3000:]}") from None
            # Traffic inside Prometheus's window, for the failure ratio's minimum of runs.
            for _ in range(WARMUP_REQUESTS):
                assert get(app.url + "/first/warmup")[1] == b"ok"
            yield app, server


def alert_states(server: PrometheusServer) -> dict[str, tuple[str, str]]:
    """alertname -> (state, task) of the alerts Prometheus holds now."""
    return {
        alert["labels"]["alertname"]: (alert["state"], alert["labels"].get("task", ""))
        for alert in server.get("/api/v1/alerts")["alerts"]
    }


def test_first_occurrence_fires_every_event_alert(
    scraped_clean: tuple[App, PrometheusServer],
) -> None:
    """One request that fails, skips, blocks and misuses once: every matching alert goes
    pending (it has a ``for:``) or firing, naming the task."""
    app, server = scraped_clean
    # The zero series alone fire nothing: so far the app only ran clean tasks.
    before = {name for name, (_, task) in alert_states(server).items() if task in EXPECTED.values()}
    assert before == set()
    assert get(app.url + "/first/trigger")[1] == b"ok"
    with_for = alerts_with_for()
    expected = {
        alert: ("pending" if alert in with_for else "firing", task)
        for alert, task in EXPECTED.items()
    }

    def reached() -> dict[str, tuple[str, str]] | None:
        found = alert_states(server)
        return found if all(found.get(a) == v for a, v in expected.items()) else None

    try:
        wait_for(reached, timeout=30, what="the first-occurrence alerts")
    except TimeoutError:
        raise AssertionError(
            f"expected {expected}, Prometheus has {alert_states(server)}\n"
            f"{app.log.read_text()[-3000:]}"
        ) from None
