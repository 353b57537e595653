"""Deployment files checked against what the worker really does: compose, dashboards, Kubernetes."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

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
