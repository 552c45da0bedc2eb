"""The deploy stack is consistent: files parse, mounts exist, ports and paths agree, and
promtool accepts the Prometheus config and passes the alert rules' unit tests.

No Docker engine runs here, so the checks are static; the real-Prometheus side of the
rules and the dashboard is tests/test_prometheus_e2e.py.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

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
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed (scripts/ensure-system-tools)")
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return found


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
    assert service["metadata"]["annotations"] == annotations
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
