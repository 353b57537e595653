"""Deployment files checked against what the worker really does: compose, dashboards, Kubernetes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def compose_services() -> dict[str, dict[str, Any]]:
    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = document["services"]
    assert isinstance(services, dict)
    return services


def test_compose_worker_stores_payloads_on_the_shared_volume() -> None:
    services = compose_services()
    volumes = yaml.safe_load((ROOT / "docker-compose.yml").read_text()).get("volumes") or {}
    worker = services["worker"]
    store = PurePosixPath(worker["environment"]["KERNELFLOW_PAYLOADS_DIR"])
    mounts = {}
    for entry in worker.get("volumes", []):
        source, _, target = str(entry).partition(":")
        mounts[PurePosixPath(target.split(":")[0])] = source
    assert store in mounts, f"the worker's payload store {store} is not a mounted volume: {mounts}"
    assert mounts[store] in volumes, f"{mounts[store]} must be a named volume other processes can mount"


# --- Prometheus and Grafana in compose ----------------------------------------------------------------

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "kernelflow.json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"


def dashboard_expressions() -> list[str]:
    document = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in document["panels"] for target in panel.get("targets", [])]


def alert_expressions() -> list[str]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in document["groups"] for rule in group["rules"]]


def metric_names(expression: str) -> set[str]:
    """Metric names an expression reads (its identifiers in the worker's families)."""
    names = set(re.findall(r"\b((?:kernelflow|gen_ai|temporal)_[a-z_]+)\b", expression))
    return {name for name in names if name not in LABELS}


LABELS = {"gen_ai_request_model", "gen_ai_token_type", "gen_ai_provider_name", "gen_ai_operation_name"}


def test_compose_worker_serves_health_and_metrics_on_the_port_prometheus_scrapes() -> None:
    services = compose_services()
    worker = services["worker"]
    port = worker["environment"]["KERNELFLOW_METRICS_PORT"]
    probe = " ".join(worker["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/readyz" in probe, probe
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"][0]
    [target] = scrape["dns_sd_configs"]
    assert target["names"] == ["worker"] and str(target["port"]) == port
    mounts = {str(v).split(":")[1] for v in services["prometheus"]["volumes"] if str(v).startswith("./")}
    assert "/etc/prometheus/alerts.yml" in mounts
    assert "/etc/prometheus/alerts.yml" in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["rule_files"]
    for volume in services["prometheus"]["volumes"] + services["grafana"]["volumes"]:
        source = str(volume).split(":")[0]
        if source.startswith("./"):
            assert (ROOT / source).exists(), f"{source} is mounted but missing"
    grace = float(worker["stop_grace_period"].rstrip("s"))
    assert grace > 20, "compose must wait longer than the worker's drain before killing it"


def test_dashboard_uses_the_provisioned_datasource() -> None:
    provisioned = yaml.safe_load(
        (ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uid = provisioned["datasources"][0]["uid"]
    document = json.loads(DASHBOARD.read_text())
    for panel in document["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], panel["title"]


def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus) is not installed (`make ops-tools`)")
    checked = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- Kubernetes ----------------------------------------------------------------------------------------

KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30"
KEDA_SCHEMA = KUBERNETES / "schemas" / "keda-scaledobject.schema.json"


def kubernetes_documents() -> list[dict[str, Any]]:
    found = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        found.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return found


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in kubernetes_documents() if doc["kind"] == kind]


def test_kubernetes_manifests_validate_against_the_schemas() -> None:
    """Core kinds against the Kubernetes OpenAPI schemas shipped by kubernetes-validate (strict: an
    unknown field is an error); the KEDA ScaledObject against its committed CRD schema."""
    import jsonschema
    import kubernetes_validate

    documents = kubernetes_documents()
    assert {doc["kind"] for doc in documents} >= {
        "Deployment",
        "ScaledObject",
        "ConfigMap",
        "PodDisruptionBudget",
    }
    keda = json.loads(KEDA_SCHEMA.read_text())
    for doc in documents:
        if doc["apiVersion"].startswith("keda.sh/"):
            jsonschema.validate(doc, keda)
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_schemas_refuse_broken_manifests() -> None:
    """The validation can fail: a misspelt field and a scaler without a task queue are refused."""
    import jsonschema
    import kubernetes_validate

    [deployment] = _by_kind("Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    [scaled] = _by_kind("ScaledObject")
    no_queue = json.loads(json.dumps(scaled))
    del no_queue["spec"]["triggers"][0]["metadata"]["taskQueue"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(no_queue, json.loads(KEDA_SCHEMA.read_text()))


def test_kubernetes_worker_probes_scaler_and_drain_agree_with_its_settings() -> None:
    [deployment] = _by_kind("Deployment")
    [scaled] = _by_kind("ScaledObject")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert str(ports["http"]) == env["KERNELFLOW_METRICS_PORT"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["terminationGracePeriodSeconds"] > float(env["KERNELFLOW_SHUTDOWN_GRACE_S"])
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "temporal"
    assert trigger["metadata"]["taskQueue"] == env["KERNELFLOW_TASK_QUEUE"]
    [config] = _by_kind("ConfigMap")
    profile = tomllib.loads(config["data"]["temporal.toml"])["profile"][env["TEMPORAL_PROFILE"]]
    assert trigger["metadata"]["endpoint"] == profile["address"]
    assert trigger["metadata"]["namespace"] == profile["namespace"]


def test_operations_guide_documents_every_metric_and_setting() -> None:
    from worker.config import WorkerSettings
    from worker.metrics import METRICS

    guide = (ROOT / "docs" / "operations.md").read_text()
    for name in METRICS:
        assert f"`{name.replace('.', '_')}" in guide, f"docs/operations.md does not document {name}"
    for variable in re.findall(
        r'env\.get\("(KERNELFLOW_[A-Z_]+)"\)', (ROOT / "worker" / "config.py").read_text()
    ):
        if variable in (
            "KERNELFLOW_CONFIG",
            "KERNELFLOW_TASK_QUEUE",
            "KERNELFLOW_PAYLOADS_STORAGE",
            "KERNELFLOW_PAYLOADS_DIR",
        ):
            continue  # documented in the README with the rest of the configuration
        assert variable in guide, f"docs/operations.md does not document {variable}"
    assert WorkerSettings.model_fields["shutdown_grace_s"].default == 20.0
