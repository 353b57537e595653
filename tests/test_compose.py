"""docker-compose.yml and the Dockerfile, checked for what a user of `docker compose up` would hit.

No Docker engine is needed: the YAML is parsed, the namespace setup script is run against a real dev
server, and `docker compose config` runs where the compose CLI is installed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import tomllib
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import ExitStack
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client

from worker.devserver import DevServer, find_temporal_binary
from worker.search_attributes import cli_type_name
from workflows.search_attributes import ALL

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SETUP_SCRIPT = ROOT / "deploy" / "temporal" / "setup-namespace.sh"

TEMPORAL_SERVER_IMAGES = ("temporalio/server", "temporalio/auto-setup")
# A service restarted whatever its exit code never "completes successfully".
NEVER_COMPLETING_RESTART_POLICIES = ("always", "unless-stopped")


def load_compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


def services() -> dict[str, dict[str, Any]]:
    found = load_compose()["services"]
    assert isinstance(found, dict)
    return found


def environment(service: Mapping[str, Any]) -> dict[str, str | None]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (item.split("=", 1) if "=" in item else (item, None) for item in raw)
        return {name: value for name, value in pairs}
    return {name: None if value is None else str(value) for name, value in raw.items()}


def depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return dict.fromkeys(raw, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in raw.items()}


def container_ports(service: Mapping[str, Any]) -> set[int]:
    ports = set()
    for mapping in service.get("ports") or []:
        ports.add(int(str(mapping).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def service_by_image(prefixes: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    matches = [
        (name, spec) for name, spec in services().items() if str(spec.get("image", "")).startswith(prefixes)
    ]
    assert len(matches) == 1, f"expected one service running {prefixes}, found {[n for n, _ in matches]}"
    return matches[0]


def command_argv(service: Mapping[str, Any]) -> list[str]:
    argv: list[str] = []
    for part in (service.get("entrypoint"), service.get("command")):
        if isinstance(part, str):
            argv += shlex.split(part)
        elif part:
            argv += [str(item) for item in part]
    return argv


def host_path_for(service: Mapping[str, Any], container_path: str) -> Path | None:
    """Where a path inside the container comes from, when a bind mount of the repo provides it."""
    target = PurePosixPath(container_path)
    for volume in service.get("volumes") or []:
        source, mount = str(volume).split(":")[:2]
        if source.startswith(".") and target.is_relative_to(mount):
            return ROOT / source / target.relative_to(mount)
    return None


def setup_service() -> tuple[str, dict[str, Any]]:
    matches = [
        (name, spec)
        for name, spec in services().items()
        if "KERNELFLOW_SEARCH_ATTRIBUTES" in environment(spec)
    ]
    assert len(matches) == 1, "exactly one service must register the search attributes"
    return matches[0]


def worker_service() -> dict[str, Any]:
    worker = services()["worker"]
    assert command_argv(worker) == ["kernelflow", "worker"]
    return worker


def parse_search_attributes(spec: str) -> dict[str, str]:
    pairs = [pair.split("=", 1) for pair in spec.split()]
    assert all(len(pair) == 2 for pair in pairs), spec
    names = [name for name, _ in pairs]
    assert len(names) == len(set(names)), f"duplicate names in {spec!r}"
    return dict(pairs)


# --- compose structure -------------------------------------------------------------------------------


def test_every_dependency_exists_and_its_condition_can_be_met() -> None:
    all_services = services()
    for name, spec in all_services.items():
        for target, condition in depends_on(spec).items():
            assert target in all_services, f"{name} depends on unknown service {target!r}"
            if condition == "service_healthy":
                assert "healthcheck" in all_services[target], f"{name} waits for {target} to be healthy"
            elif condition == "service_completed_successfully":
                restart = all_services[target].get("restart")
                assert restart not in NEVER_COMPLETING_RESTART_POLICIES, (
                    f"{target} must exit for {name} to start"
                )
            else:
                assert condition == "service_started", f"{name}: unknown condition {condition!r}"


def test_worker_connects_to_the_temporal_service() -> None:
    server_name, server = service_by_image(TEMPORAL_SERVER_IMAGES)
    worker_env = environment(worker_service())

    host, port = str(worker_env["TEMPORAL_ADDRESS"]).rsplit(":", 1)
    assert host == server_name
    assert int(port) in container_ports(server)
    assert worker_env["TEMPORAL_NAMESPACE"] == environment(setup_service()[1])["KERNELFLOW_NAMESPACE"]
    assert depends_on(worker_service()).get(setup_service()[0]) == "service_completed_successfully"


def test_ui_points_at_the_temporal_service() -> None:
    server_name, server = service_by_image(TEMPORAL_SERVER_IMAGES)
    _, ui = service_by_image(("temporalio/ui",))

    host, port = str(environment(ui)["TEMPORAL_ADDRESS"]).rsplit(":", 1)
    assert host == server_name
    assert int(port) in container_ports(server)
    assert 8080 in container_ports(ui)


def test_postgres_has_a_healthcheck_and_keeps_its_data_in_a_volume() -> None:
    _, postgres = service_by_image(("postgres:",))
    assert "pg_isready" in json.dumps(postgres["healthcheck"]["test"])
    named_volumes = load_compose().get("volumes") or {}
    data_volumes = [v for v in postgres.get("volumes", []) if str(v).endswith(":/var/lib/postgresql/data")]
    assert data_volumes, "PostgreSQL data must live in a volume"
    assert str(data_volumes[0]).split(":")[0] in named_volumes


def test_setup_registers_exactly_the_workflow_search_attributes() -> None:
    _, setup = setup_service()
    registered = parse_search_attributes(str(environment(setup)["KERNELFLOW_SEARCH_ATTRIBUTES"]))
    assert registered == {key.name: cli_type_name(key) for key in ALL}


def test_scripts_and_config_mounted_from_the_repo_exist() -> None:
    for name, spec in services().items():
        for volume in spec.get("volumes") or []:
            source = str(volume).split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
        for arg in command_argv(spec):
            if arg.startswith("/"):
                provided = host_path_for(spec, arg)
                assert provided is None or provided.is_file(), f"{name} runs missing {arg}"

    _, setup = setup_service()
    assert host_path_for(setup, command_argv(setup)[-1]) == SETUP_SCRIPT


def test_images_are_pinned() -> None:
    for name, spec in services().items():
        image = spec.get("image")
        assert image or "build" in spec, f"{name} has neither image nor build"
        if image is None:
            continue
        repository, _, tag = str(image).rpartition(":")
        assert repository and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest", f"{name}: image {image!r} is not pinned"


def test_simulator_is_the_default_openai_endpoint() -> None:
    worker_env = environment(worker_service())
    simulator = services()["simulator"]
    argv = command_argv(simulator)
    assert argv[:3] == ["python", "-m", "simulator"]
    port = int(argv[argv.index("--port") + 1])

    default = re.fullmatch(r"\$\{OPENAI_BASE_URL:-(.+)\}", str(worker_env["OPENAI_BASE_URL"]))
    assert default, "OPENAI_BASE_URL must default to the simulator and be overridable"
    assert default.group(1) == f"http://simulator:{port}/v1"
    assert str(worker_env["OPENAI_API_KEY"]).startswith("${OPENAI_API_KEY:-")


# --- Dockerfile ---------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_runs_the_worker_as_a_non_root_user() -> None:
    assert DOCKERFILE.is_file()
    instructions = dockerfile_instructions()

    assert ("FROM", "python:3.11-slim") in instructions
    cmds = [json.loads(arg) for op, arg in instructions if op == "CMD"]
    assert cmds[-1] == ["kernelflow", "worker"]
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0")

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "kernelflow" in scripts, "the image's CMD needs the kernelflow console script"


def test_dockerfile_copies_every_package_the_project_installs() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {
        pattern.rstrip("*") for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = {
        source.rstrip("/")
        for op, arg in dockerfile_instructions()
        if op == "COPY"
        for source in arg.split()[:-1]
    }
    assert packages <= copied, f"not copied into the image: {sorted(packages - copied)}"


# --- the setup script against a real server ----------------------------------------------------------


@pytest.fixture(scope="module")
async def dev_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DevServer]:
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(2)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        port, ui_port = (sock.getsockname()[1] for sock in sockets)
    async with DevServer(
        state_dir=tmp_path_factory.mktemp("compose-state"), port=port, ui_port=ui_port, headless=True
    ) as server:
        yield server


@pytest.mark.timeout(240)
async def test_setup_script_creates_the_namespace_with_its_search_attributes(dev_server: DevServer) -> None:
    _, setup = setup_service()
    namespace = f"kf-compose-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "PATH": f"{Path(find_temporal_binary()).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "TEMPORAL_ADDRESS": dev_server.target,
        "KERNELFLOW_NAMESPACE": namespace,
        "KERNELFLOW_SEARCH_ATTRIBUTES": str(environment(setup)["KERNELFLOW_SEARCH_ATTRIBUTES"]),
        "KERNELFLOW_SETUP_ATTEMPTS": "120",
    }

    for run in ("first", "second"):  # the second run proves `docker compose up` can be repeated
        process = await asyncio.create_subprocess_exec(
            "sh", str(SETUP_SCRIPT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        output, _ = await process.communicate()
        assert process.returncode == 0, f"{run} run failed:\n{output.decode()}"

    client = await Client.connect(dev_server.target, namespace=namespace)
    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    registered = {name: int(kind) for name, kind in listed.custom_attributes.items()}
    assert {key.name: registered.get(key.name) for key in ALL} == {
        key.name: int(key.indexed_value_type) for key in ALL
    }


# --- docker compose itself -----------------------------------------------------------------------------


def test_docker_compose_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("the docker binary is not installed, so `docker compose config` cannot run")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        first_line = ((probe.stderr or probe.stdout).strip().splitlines() or ["no output"])[0]
        pytest.skip(f"the docker compose plugin is not installed ({first_line})")

    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
