"""Deployment files checked against what the worker really does: compose, dashboards, Kubernetes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
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
