"""The Grafana dashboard is importable as-is and covers exactly the metrics the code emits."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from taskscope._signals.prometheus import METRIC_NAMES as TASK_METRIC_NAMES

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_PATH = ROOT / "dashboards" / "taskscope.json"
RULES_PATH = ROOT / "deploy" / "prometheus" / "alerts.yml"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRIC = re.compile(r"\btaskscope_[a-z0-9_]+")


def otlp_metric_names() -> tuple[str, ...]:
    """The loss counters of taskscope.otlp, as the code registers them."""
    from taskscope._otlp.counting import counters_for

    registry = CollectorRegistry()
    counters_for(registry)
    return tuple(
        sorted(
            {
                sample.name
                for metric in registry.collect()
                for sample in metric.samples
                if sample.name.endswith("_total")
            }
        )
    )


OTLP_METRIC_NAMES = otlp_metric_names()
METRIC_NAMES = (*TASK_METRIC_NAMES, *OTLP_METRIC_NAMES)
NO_TASK_LABEL = {
    "taskscope_event_loop_lag_seconds",
    "taskscope_instrumentation_errors_total",
    *OTLP_METRIC_NAMES,
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD_PATH.read_text())
    return loaded


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def targets(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in all_panels(dashboard["panels"]):
        yield from panel.get("targets", [])


def family(name: str) -> str:
    """The metric family a scraped series name belongs to (``_bucket`` etc. stripped)."""
    if name in METRIC_NAMES:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in METRIC_NAMES:
            return name.removesuffix(suffix)
    return name


def metrics_in(text: str) -> set[str]:
    return set(METRIC.findall(text))


def dashboard_metrics(dashboard: dict[str, Any]) -> set[str]:
    found: set[str] = set()
    for target in targets(dashboard):
        found |= metrics_in(target["expr"])
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query)
        found |= metrics_in(text)
    return found


def rule_metrics() -> set[str]:
    groups = yaml.safe_load(RULES_PATH.read_text())["groups"]
    return {name for g in groups for rule in g["rules"] for name in metrics_in(rule["expr"])}


def test_identity_and_schema(dashboard: dict[str, Any]) -> None:
    """Stable uid (links and provisioning rely on it), a schema version, no import inputs."""
    assert dashboard["uid"] == "taskscope"
    assert isinstance(dashboard["schemaVersion"], int)
    assert dashboard["schemaVersion"] >= 36
    assert dashboard.get("id") is None
    assert "__inputs" not in dashboard
    assert "${DS_" not in DASHBOARD_PATH.read_text()


def test_template_variables(dashboard: dict[str, Any]) -> None:
    """datasource (prometheus), then cluster, namespace, job, instance and task from
    taskscope_tasks_total, each narrowed by the ones before it."""
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    order = ["datasource", "cluster", "namespace", "job", "instance", "task"]
    assert list(variables)[: len(order)] == order
    source = variables["datasource"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    for index, name in enumerate(order[1:], start=1):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"]["uid"] == "${datasource}"
        assert variable["includeAll"] is True
        query = variable["query"]["query"]
        assert query.startswith("label_values(taskscope_tasks_total")
        assert query.endswith(f", {name})")
        for before in order[1:index]:
            assert f'{before}=~"${before}"' in query, name
    # kube-prometheus-stack adds cluster/namespace; plain Prometheus does not, and ".+"
    # would then match nothing: those two match absent labels with ".*".
    assert variables["cluster"]["allValue"] == variables["namespace"]["allValue"] == ".*"


# grafana/dashboard-linter's rule set (lint/rules.go), applied here in Python.
LINTER_UNITS = {"none", "short", "percent", "percentunit", "ops", "reqps", "s", "ms", "bytes"}


def test_dashboard_linter_rules(dashboard: dict[str, Any]) -> None:
    """uneditable-dashboard, template-datasource, template-job/instance (query from
    $datasource, title-cased label, multi, allValue ".+"), on-time-range reload,
    panel title/description/units, target rate-interval and counter-aggregation rules."""
    assert dashboard["editable"] is False
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["label"] == "Data source"
    for name in ("job", "instance", "task"):
        variable = variables[name]
        assert variable["datasource"]["uid"] in ("$datasource", "${datasource}"), name
        assert variable["label"] == name.title(), name
        assert variable["multi"] is True, name
        assert variable["allValue"] == ".+", name
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["refresh"] == 2, variable["name"]  # on time range change
    for panel in all_panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["title"], panel["id"]
        assert panel.get("description"), panel["title"]
        if panel["type"] in ("stat", "table", "timeseries", "gauge"):
            assert panel["fieldConfig"]["defaults"].get("unit") in LINTER_UNITS, panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            for function, window in re.findall(r"\b(i?rate|increase)\([^\[]*\[([^\]]+)\]", expr):
                if function != "increase":
                    assert window == "$__rate_interval", expr
            for counter in re.findall(r"taskscope_[a-z0-9_]+_total\{[^}]*\}(\[)?", expr):
                assert counter == "[", f"counter without rate/increase in {expr}"


def test_heatmaps_use_rates_and_ask_for_the_exemplars_they_colour(
    dashboard: dict[str, Any],
) -> None:
    """Heatmaps plot rate() of buckets (increase() over $__rate_interval changes with the
    zoom); a heatmap that colours exemplars requests them, and only where they exist."""
    heatmaps = [p for p in all_panels(dashboard["panels"]) if p["type"] == "heatmap"]
    assert heatmaps
    for panel in heatmaps:
        (target,) = panel["targets"]
        assert "increase(" not in target["expr"], panel["title"]
        assert re.search(r"\brate\(taskscope_[a-z_]+_bucket\{", target["expr"]), panel["title"]
        coloured = "exemplars" in panel["options"]
        assert target["exemplar"] is coloured, panel["title"]
        if coloured:
            assert "taskscope_task_duration_seconds_bucket" in target["expr"], panel["title"]


def test_loop_busy_is_a_share_of_one_loop(dashboard: dict[str, Any]) -> None:
    """Busy seconds per second summed over instances would pass 100 %: the panel divides
    by the number of instances."""
    (panel,) = [p for p in all_panels(dashboard["panels"]) if "Loop busy" in p["title"]]
    (target,) = panel["targets"]
    assert panel["fieldConfig"]["defaults"]["unit"] == "percentunit"
    assert "/ scalar(count(count by (cluster, namespace, job, instance)" in target["expr"]


def test_task_panels_drill_down_to_one_task(dashboard: dict[str, Any]) -> None:
    """Panels with a series (or row) per task link to this dashboard filtered to that task,
    keeping the time range and the other variables."""
    linked = 0
    for panel in all_panels(dashboard["panels"]):
        if not any(
            "{{task}}" in t.get("legendFormat", "")
            or (panel["type"] == "table" and "by (task" in t["expr"])
            for t in panel.get("targets", [])
        ):
            continue
        links = panel["fieldConfig"]["defaults"].get("links", []) + [
            link
            for override in panel["fieldConfig"]["overrides"]
            for prop in override["properties"]
            if prop["id"] == "links"
            for link in prop["value"]
        ]
        assert links, panel["title"]
        for link in links:
            assert link["url"].startswith(f"/d/{dashboard['uid']}/"), panel["title"]
            assert "${__url_time_range}" in link["url"]
            assert "${job:queryparam}" in link["url"]
            assert re.search(r"var-task=\$\{__(field\.labels|data\.fields)\.task\}", link["url"])
        linked += 1
    assert linked >= 10


def test_every_panel_and_target_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    """No hard-coded data source anywhere: a provisioned copy works in any Grafana."""
    for panel in all_panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]


def test_panel_ids_unique(dashboard: dict[str, Any]) -> None:
    """Grafana keys panel state (links, edits) by id."""
    ids = [panel["id"] for panel in all_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))
    assert all(isinstance(i, int) and i > 0 for i in ids)


def test_grid_positions_fit_and_do_not_overlap(dashboard: dict[str, Any]) -> None:
    """Every panel lies within the 24-column grid and no two panels share a cell."""
    taken: dict[tuple[int, int], str] = {}
    for panel in all_panels(dashboard["panels"]):
        pos = panel["gridPos"]
        x, y, w, h = pos["x"], pos["y"], pos["w"], pos["h"]
        assert x >= 0, panel["title"]
        assert y >= 0, panel["title"]
        assert w >= 1, panel["title"]
        assert h >= 1, panel["title"]
        assert x + w <= 24, panel["title"]
        for cell in ((cx, cy) for cx in range(x, x + w) for cy in range(y, y + h)):
            assert cell not in taken, f"{panel['title']} overlaps {taken[cell]} at {cell}"
            taken[cell] = panel["title"]


def test_rows_in_order(dashboard: dict[str, Any]) -> None:
    """The sections a reader expects, top to bottom."""
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == [
        "Overview",
        "Latency",
        "Failures",
        "Event loop",
        "Threadpool pressure",
        "Instrumentation health",
        "Queue workers",
        "Hung tasks",
    ]


def test_targets_are_filtered_by_the_variables(dashboard: dict[str, Any]) -> None:
    """Every selector of a taskscope metric honours $job and $instance, and $task when
    the family has a task label."""
    selector = re.compile(r"(taskscope_[a-z0-9_]+)\{([^}]*)\}")
    for target in targets(dashboard):
        expr = target["expr"]
        names = metrics_in(expr)
        assert names, expr
        assert len(selector.findall(expr)) == len(METRIC.findall(expr)), expr
        for name, labels in selector.findall(expr):
            assert 'cluster=~"$cluster"' in labels, expr
            assert 'namespace=~"$namespace"' in labels, expr
            assert 'job=~"$job"' in labels, expr
            assert 'instance=~"$instance"' in labels, expr
            if family(name) not in NO_TASK_LABEL:
                assert 'task=~"$task"' in labels, expr


def test_duration_panels_show_exemplars(dashboard: dict[str, Any]) -> None:
    """Range queries on the histograms that carry trace-id exemplars ask for them."""
    with_exemplars = ("taskscope_task_duration_seconds", "taskscope_task_loop_block_seconds")
    for family_name in with_exemplars:
        hits = [
            t
            for t in targets(dashboard)
            if family_name + "_bucket" in t["expr"] and t.get("format") != "heatmap"
        ]
        assert hits, family_name
        assert all(t["exemplar"] is True for t in hits), family_name


def test_every_metric_family_is_on_the_dashboard(dashboard: dict[str, Any]) -> None:
    """A metric the code emits but no panel shows is a metric nobody will look at."""
    assert OTLP_METRIC_NAMES == (
        "taskscope_otlp_export_failures_total",
        "taskscope_otlp_spans_dropped_total",
    )
    used = {family(name) for name in dashboard_metrics(dashboard)}
    assert set(METRIC_NAMES) - used == set()


def test_dashboard_and_rules_use_only_emitted_metrics(dashboard: dict[str, Any]) -> None:
    """A misspelt name gives an empty panel, not an error: only real families are used."""
    for name in dashboard_metrics(dashboard) | rule_metrics():
        assert family(name) in METRIC_NAMES, name
        if name not in METRIC_NAMES:  # a histogram sample, not a counter's _total family
            assert name.endswith(HISTOGRAM_SUFFIXES), name
            assert not family(name).endswith("_total"), name


def test_queries_are_balanced(dashboard: dict[str, Any]) -> None:
    """Cheap syntax check (the e2e test runs every query on a real Prometheus)."""
    for target in targets(dashboard):
        expr = target["expr"]
        for opening, closing in ("()", "{}", "[]"):
            assert expr.count(opening) == expr.count(closing), expr
        assert target["refId"], expr
