"""The deploy stack is consistent: files parse, mounts exist, ports and paths agree, and
promtool accepts the Prometheus config and passes the alert rules' unit tests.

No Docker engine runs here, so the checks are static; the real-Prometheus side of the
rules and the dashboard is tests/test_prometheus_e2e.py.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.system_tools import system_tool

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
KUBERNETES = DEPLOY / "kubernetes"
APP_PORT = 8000
METRICS_PATH = "/metrics"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = load(DEPLOY / "docker-compose.yml")
    return loaded


def k8s(kind: str) -> dict[str, Any]:
    found = [doc for path in sorted(KUBERNETES.glob("*.yaml")) for doc in load_all(path)]
    matching: list[dict[str, Any]] = [doc for doc in found if doc["kind"] == kind]
    assert len(matching) == 1, kind
    return matching[0]


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source relative to deploy/, target) of a service's bind mounts (short syntax)."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        assert source.startswith("."), f"{volume}: only bind mounts of repo files expected"
        mounts.append((source, target))
    return mounts


def promtool() -> str:
    return system_tool("promtool", "prometheus")


def run_promtool(*args: str) -> str:
    result = subprocess.run(
        [promtool(), *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


@pytest.mark.parametrize(
    "path",
    sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")]),
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_every_yaml_file_parses(path: Path) -> None:
    """A YAML typo would only show when the stack starts."""
    assert load_all(path), path


def test_compose_has_the_whole_stack(compose: dict[str, Any]) -> None:
    """The seven services, with images pinned to a version (no :latest drift)."""
    services = compose["services"]
    assert set(services) == {
        "app", "prometheus", "grafana", "otel-collector", "tempo", "redis", "worker",
    }  # fmt: skip
    assert services["worker"]["image"] == services["app"]["image"]  # built once, by app
    for name, service in services.items():
        if name in ("app", "worker"):
            continue
        image = service["image"]
        assert re.search(r":v?\d+\.\d+", image), image


def test_every_mounted_file_exists(compose: dict[str, Any]) -> None:
    """Every bind mount's source is a file of this repository (a typo mounts an empty dir)."""
    for name, service in compose["services"].items():
        for source, _ in bind_mounts(service):
            assert (DEPLOY / source).is_file(), f"{name}: {source}"


def test_app_image_builds_from_this_repo(compose: dict[str, Any]) -> None:
    """The app is built from deploy/Dockerfile with the [demo] extra; COPY sources exist."""
    build = compose["services"]["app"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == ROOT
    dockerfile = context / build["dockerfile"]
    text = dockerfile.read_text()
    assert 'pip install ".[demo]"' in text
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (context / source).exists(), source
    ignore = Path(f"{dockerfile}.dockerignore").read_text().split()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert f"!{source.rstrip('/')}" in [i.rstrip("/") for i in ignore], source


def test_app_port_and_metrics_path_agree_everywhere(compose: dict[str, Any]) -> None:
    """The demo's default port and /metrics path are what every scraper is pointed at."""
    from taskscope.demo import app as demo_app
    from taskscope.demo import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert parser.parse_args([]).port == APP_PORT
    assert f'Route("{METRICS_PATH}"' in inspect.getsource(demo_app.create_app)

    app = compose["services"]["app"]
    command = app["command"]
    assert command[:2] == ["taskscope", "demo"]
    assert command[command.index("--port") + 1] == str(APP_PORT)
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--duration") + 1] == "0"
    assert f"{APP_PORT}:{APP_PORT}" in app["ports"]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"EXPOSE {APP_PORT}" in dockerfile
    assert f'"--port", "{APP_PORT}"' in dockerfile

    jobs = {job["job_name"]: job for job in load(PROMETHEUS / "prometheus.yml")["scrape_configs"]}
    demo = jobs["taskscope-demo"]
    assert demo["metrics_path"] == METRICS_PATH
    assert demo["static_configs"][0]["targets"] == [f"app:{APP_PORT}"]

    deployment = k8s("Deployment")
    pod = deployment["spec"]["template"]
    annotations = pod["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(APP_PORT),
        "prometheus.io/path": METRICS_PATH,
    }
    (container,) = pod["spec"]["containers"]
    assert container["ports"] == [{"name": "http", "containerPort": APP_PORT, "protocol": "TCP"}]
    assert container["args"][container["args"].index("--port") + 1] == str(APP_PORT)
    assert container["readinessProbe"]["httpGet"]["path"] == METRICS_PATH
    service = k8s("Service")
    # Annotating the Service too would make the usual configs scrape every pod twice.
    assert not any(
        key.startswith("prometheus.io/") for key in service["metadata"].get("annotations", {})
    )
    assert service["spec"]["ports"][0]["port"] == APP_PORT
    assert service["spec"]["ports"][0]["name"] == "http"


def test_operator_monitors_select_the_app() -> None:
    """PodMonitor and ServiceMonitor select the app's labels and scrape its http port."""
    deployment = k8s("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = k8s("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    pod_monitor = k8s("PodMonitor")["spec"]
    assert pod_monitor["selector"]["matchLabels"].items() <= labels.items()
    assert [(e["port"], e["path"]) for e in pod_monitor["podMetricsEndpoints"]] == [
        ("http", METRICS_PATH)
    ]
    service_monitor = k8s("ServiceMonitor")["spec"]
    assert (
        service_monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert [(e["port"], e["path"]) for e in service_monitor["endpoints"]] == [
        ("http", METRICS_PATH)
    ]


def test_prometheusrule_carries_the_same_alerts() -> None:
    """The Kubernetes PrometheusRule and alerts.yml never drift apart."""
    rule = k8s("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == load(PROMETHEUS / "alerts.yml")["groups"]


def test_prometheus_mounts_its_config_and_rules(compose: dict[str, Any]) -> None:
    """The config's rule_files resolve, inside the container, to the mounted alerts.yml."""
    service = compose["services"]["prometheus"]
    mounts = dict(bind_mounts(service))
    config_target = mounts["./prometheus/prometheus.yml"]
    assert f"--config.file={config_target}" in service["command"]
    assert "--enable-feature=exemplar-storage" in service["command"]
    config = load(PROMETHEUS / "prometheus.yml")
    for rule_file in config["rule_files"]:
        in_container = Path(config_target).parent / rule_file
        assert str(in_container) in mounts.values(), rule_file
        assert (PROMETHEUS / rule_file).is_file()


def test_telemetry_pipeline_is_wired(compose: dict[str, Any]) -> None:
    """app -> collector (OTLP/HTTP) -> Tempo (OTLP/gRPC); Prometheus scrapes the
    collector's exporter; Grafana's data sources reach Prometheus and Tempo."""
    services = compose["services"]
    collector = load(DEPLOY / "otel-collector" / "config.yaml")
    tempo = load(DEPLOY / "tempo" / "tempo.yaml")

    endpoint = services["app"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    http_in = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert endpoint == f"http://otel-collector:{http_in.rsplit(':', 1)[1]}"
    assert "4318:4318" in services["otel-collector"]["ports"]

    tempo_in = tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert collector["exporters"]["otlp/tempo"]["endpoint"] == f"tempo:{tempo_in.rsplit(':', 1)[1]}"
    pipelines = collector["service"]["pipelines"]
    assert pipelines["traces"]["exporters"] == ["otlp/tempo"]
    assert pipelines["metrics"]["exporters"] == ["prometheus"]
    exporter = collector["exporters"]["prometheus"]
    assert exporter["namespace"] == "otel"  # never doubles the taskscope_* series
    jobs = {job["job_name"]: job for job in load(PROMETHEUS / "prometheus.yml")["scrape_configs"]}
    exporter_port = exporter["endpoint"].rsplit(":", 1)[1]
    assert jobs["otel-collector"]["static_configs"][0]["targets"] == [
        f"otel-collector:{exporter_port}"
    ]

    sources = {
        s["uid"]: s
        for s in load(DEPLOY / "grafana/provisioning/datasources/datasources.yml")["datasources"]
    }
    assert sources["prometheus"]["url"] == "http://prometheus:9090"
    assert "9090:9090" in services["prometheus"]["ports"]
    assert sources["tempo"]["url"] == f"http://tempo:{tempo['server']['http_listen_port']}"
    (destination,) = sources["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert destination == {"name": "trace_id", "datasourceUid": "tempo"}
    assert sources["prometheus"]["isDefault"] is True


def test_grafana_provisions_the_dashboard(compose: dict[str, Any]) -> None:
    """The dashboards provider reads the directory where dashboards/taskscope.json is mounted."""
    grafana = compose["services"]["grafana"]
    mounts = dict(bind_mounts(grafana))
    dashboard_target = mounts["../dashboards/taskscope.json"]
    (provider,) = load(DEPLOY / "grafana/provisioning/dashboards/taskscope.yml")["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == str(Path(dashboard_target).parent)
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == dashboard_target
    for source, target in mounts.items():
        if source.startswith("./grafana/provisioning/"):
            assert target == "/etc/grafana/" + source.removeprefix("./grafana/")


def test_promtool_checks_the_config() -> None:
    """promtool accepts prometheus.yml (and the rule file it names); it does not resolve
    the compose host names."""
    output = run_promtool("check", "config", "deploy/prometheus/prometheus.yml")
    assert "SUCCESS" in output


def test_promtool_checks_the_rules(tmp_path: Path) -> None:
    """Both rule files (plain and the operator's PrometheusRule spec) are valid rules."""
    spec = tmp_path / "prometheusrule-spec.yml"
    spec.write_text(yaml.safe_dump(k8s("PrometheusRule")["spec"]))
    output = run_promtool("check", "rules", "deploy/prometheus/alerts.yml", str(spec))
    count = sum(len(g["rules"]) for g in load(PROMETHEUS / "alerts.yml")["groups"])
    assert output.count(f"SUCCESS: {count} rules found") == 2, output


def test_promtool_alert_unit_tests_pass() -> None:
    """Each alert fires on a series built to trip it and stays silent on one that must not."""
    output = run_promtool("test", "rules", "deploy/prometheus/alerts_test.yml")
    assert "SUCCESS" in output


def test_alert_unit_tests_cover_every_alert() -> None:
    """alerts_test.yml has a firing expectation for every alert in alerts.yml."""
    alerts = {r["alert"] for g in load(PROMETHEUS / "alerts.yml")["groups"] for r in g["rules"]}
    tested = {
        case["alertname"]
        for test in load(PROMETHEUS / "alerts_test.yml")["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    silent = {
        case["alertname"]
        for test in load(PROMETHEUS / "alerts_test.yml")["tests"]
        for case in test["alert_rule_test"]
        if not case["exp_alerts"]
    }
    assert tested == alerts
    assert silent == alerts


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading (lower case, punctuation dropped)."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


# Alerts on one event fire at once; trends (rates, ratios, percentiles) need `for:`.
ONE_EVENT_ALERTS = {
    "TaskscopeTasksSkipped",
    "TaskscopeTasksAbandoned",
    "TaskscopeEventLoopBlocked",
    "TaskscopeTaskMisuse",
    "TaskscopeInstrumentationErrors",
    "TaskscopeOtlpSpansDropped",
    "TaskscopeTasksRejected",
}


def test_every_alert_carries_the_on_call_contract() -> None:
    """Severity, summary, description, a runbook_url to an existing docs/runbook.md section,
    a dashboard_url to this dashboard's uid and variables, and `for:` on every alert that is
    not about one event; no alert pages (critical) out of the box."""
    dashboard = json.loads((ROOT / "dashboards" / "taskscope.json").read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    anchors = {github_anchor(h) for h in re.findall(r"^## (.+)$", runbook, re.MULTILINE)}
    rules = [r for g in load(PROMETHEUS / "alerts.yml")["groups"] for r in g["rules"]]
    for rule in rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "info"}, name
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook_url", "dashboard_url"} <= set(annotations)
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert page.endswith("/docs/runbook.md"), name
        assert anchor == name.lower(), name
        assert anchor in anchors, name
        url = urllib.parse.urlsplit(annotations["dashboard_url"])
        assert url.path.startswith(f"/d/{dashboard['uid']}/"), name
        params = urllib.parse.parse_qs(url.query)
        assert params, name
        assert {key.removeprefix("var-") for key in params} <= variables, name
        assert ("for" in rule) == (name not in ONE_EVENT_ALERTS), name


def test_alert_aggregations_keep_namespace_and_cluster() -> None:
    """Every `sum by`/`max by` groups by namespace and cluster too (kube-prometheus-stack
    groups alerts by namespace; two namespaces' tasks must not add up)."""
    for group in load(PROMETHEUS / "alerts.yml")["groups"]:
        for rule in group["rules"]:
            clauses = re.findall(r"\b(?:sum|max|min|avg|count) by \(([^)]*)\)", rule["expr"])
            assert clauses, rule["alert"]
            for clause in clauses:
                labels = {label.strip() for label in clause.split(",")}
                assert {"namespace", "cluster", "job"} <= labels, (rule["alert"], clause)


def test_ratio_alerts_have_a_minimum_traffic_guard() -> None:
    """A ratio or percentile of a handful of tasks is noise: those rules demand 10 tasks."""
    for group in load(PROMETHEUS / "alerts.yml")["groups"]:
        for rule in group["rules"]:
            expr = rule["expr"]
            per_task_ratio = "/" in expr or "histogram_quantile" in expr
            if per_task_ratio and "event_loop_lag" not in expr:  # the heartbeat never stops
                assert re.search(r"increase\([^)]*(_count|_total)\[\d+m\]\)\) >= 10", expr), rule[
                    "alert"
                ]


# -- Kubernetes and compose against the schemas their tools use ---------------------------

CRD_SCHEMAS = ROOT / "tests" / "schemas" / "prometheus-operator"
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def kubernetes_documents() -> list[dict[str, Any]]:
    return [doc for path in sorted(KUBERNETES.glob("*.yaml")) for doc in load_all(path)]


def closed(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD schema as ``kubectl --validate=strict`` applies it: an object with declared
    properties and no ``additionalProperties`` / preserve-unknown-fields rejects others."""
    result = dict(schema)
    if "properties" in result:
        result["properties"] = {k: closed(v) for k, v in result["properties"].items()}
        if "additionalProperties" not in result and not result.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            result["additionalProperties"] = False
    if isinstance(result.get("additionalProperties"), dict):
        result["additionalProperties"] = closed(result["additionalProperties"])
    if isinstance(result.get("items"), dict):
        result["items"] = closed(result["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in result:
            result[key] = [closed(item) for item in result[key]]
    return result


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_match_the_kubernetes_schemas(version: str) -> None:
    """Deployment and Service validate (strictly: unknown fields are errors) against the
    Kubernetes JSON schemas of the oldest and newest version we check."""
    core = [
        doc for doc in kubernetes_documents() if "monitoring.coreos.com" not in doc["apiVersion"]
    ]
    assert {doc["kind"] for doc in core} == {"Deployment", "Service"}
    for doc in core:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("kind", ["PodMonitor", "ServiceMonitor", "PrometheusRule"])
def test_operator_resources_match_the_vendored_crd_schemas(kind: str) -> None:
    """PodMonitor, ServiceMonitor and PrometheusRule validate against prometheus-operator's
    own CRD schemas (vendored, unknown fields rejected)."""
    schema = json.loads((CRD_SCHEMAS / f"{kind.lower()}-monitoring-v1.json").read_text())
    assert schema["x-kubernetes-group-version-kind"]["kind"] == kind
    doc = k8s(kind)
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    body = {key: value for key, value in doc.items() if key != "metadata"}
    jsonschema.Draft7Validator(closed(schema)).validate(body)  # Go regexes: no check_schema


def test_schema_validation_catches_a_typo() -> None:
    """The validations above can fail: a misspelt field is refused by each of them."""
    deployment = json.loads(json.dumps(k8s("Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    monitor = k8s("PodMonitor")
    body = {
        "apiVersion": monitor["apiVersion"],
        "kind": "PodMonitor",
        "spec": {"podMetricEndpoints": []},
    }
    schema = json.loads((CRD_SCHEMAS / "podmonitor-monitoring-v1.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(closed(schema)).validate(body)  # Go regexes: no check_schema


def test_pod_security_restricted() -> None:
    """The Deployment meets Pod Security "restricted": numeric non-root user equal to the
    image's USER, no privilege escalation, capabilities dropped, RuntimeDefault seccomp."""
    pod = k8s("Deployment")["spec"]["template"]["spec"]
    user = re.search(r"^USER (\d+):(\d+)$", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)
    assert user, "the Dockerfile's USER must be numeric (uid:gid) for runAsNonRoot"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(user.group(1)) != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert "add" not in context["capabilities"]
        assert context["runAsNonRoot"] is True
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}


def test_compose_file_matches_the_compose_spec() -> None:
    """docker-compose.yml validates against the compose-spec schema (check-jsonschema's
    vendored copy, the one Docker Compose follows)."""
    tool = Path(sys.executable).parent / "check-jsonschema"
    result = subprocess.run(
        [str(tool), "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "docker-compose.yml")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_collector_limits_memory_first() -> None:
    """Every collector pipeline starts with memory_limiter, below the container's limit."""
    collector = load(DEPLOY / "otel-collector" / "config.yaml")
    limiter = collector["processors"]["memory_limiter"]
    for pipeline in collector["service"]["pipelines"].values():
        assert pipeline["processors"][0] == "memory_limiter"
    compose = load(DEPLOY / "docker-compose.yml")
    limit = compose["services"]["otel-collector"]["mem_limit"]
    assert limit.endswith("m")
    assert limiter["limit_mib"] < int(limit.removesuffix("m"))


def test_tempo_service_map_only_with_a_metrics_generator() -> None:
    """Grafana's service map reads Tempo's metrics generator: declared only if it runs."""
    tempo = load(DEPLOY / "tempo" / "tempo.yaml")
    sources = load(DEPLOY / "grafana/provisioning/datasources/datasources.yml")["datasources"]
    (tempo_source,) = [s for s in sources if s["type"] == "tempo"]
    assert ("serviceMap" in tempo_source["jsonData"]) == ("metrics_generator" in tempo)
