"""The deploy stack's Celery worker (compose and Kubernetes) is wired consistently."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
WORKER_PORT = "9464"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_compose_worker_is_scraped_and_publishes_through_redis() -> None:
    """The app publishes to redis, the worker consumes it, Prometheus scrapes the worker."""
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    worker = services["worker"]
    script = " ".join(worker["command"])
    assert "celery -A taskscope.demo.worker worker" in script
    assert "--pool=prefork" in script
    env = worker["environment"]
    assert env["PROMETHEUS_MULTIPROC_DIR"] in script.replace(
        "$$PROMETHEUS_MULTIPROC_DIR", env["PROMETHEUS_MULTIPROC_DIR"]
    )
    assert env["TASKSCOPE_DEMO_WORKER_METRICS_PORT"] == WORKER_PORT
    assert env["TASKSCOPE_DEMO_WORKER_METRICS_ADDR"] == "0.0.0.0"
    broker = env["TASKSCOPE_DEMO_BROKER"]
    assert broker.startswith("redis://redis:")
    app = services["app"]["command"]
    assert app[app.index("--broker") + 1] == broker
    jobs = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"] for job in jobs["scrape_configs"]
    }
    assert targets["taskscope-worker"] == [f"worker:{WORKER_PORT}"]


def test_kubernetes_worker_example() -> None:
    """Deployment: metrics port, multiprocess directory on an emptyDir; PodMonitor selects it."""
    docs = {
        doc["kind"]: doc for doc in _docs(DEPLOY / "kubernetes" / "worker" / "celery-worker.yaml")
    }
    pod = docs["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert container["ports"] == [
        {"name": "metrics", "containerPort": int(WORKER_PORT), "protocol": "TCP"}
    ]
    assert env["TASKSCOPE_DEMO_WORKER_METRICS_PORT"] == WORKER_PORT
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == WORKER_PORT
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts[env["PROMETHEUS_MULTIPROC_DIR"]]]
    monitor = docs["PodMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert [(e["port"], e["path"]) for e in monitor["podMetricsEndpoints"]] == [
        ("metrics", "/metrics")
    ]


def test_worker_module_reads_the_variables_the_deploy_sets() -> None:
    """taskscope.demo.worker reads the metrics port/address and broker variables."""
    demo = ROOT / "src" / "taskscope" / "demo"  # read, not imported (it instruments)
    source = (demo / "worker.py").read_text() + (demo / "queue.py").read_text()
    for name in (
        "TASKSCOPE_DEMO_BROKER",
        "TASKSCOPE_DEMO_WORKER_METRICS_PORT",
        "TASKSCOPE_DEMO_WORKER_METRICS_ADDR",
    ):
        assert name in source
